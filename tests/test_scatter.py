"""The scatter autograd function against a dense reference: form M = BA, flatten, cut, reshape."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gfa_peft.layout import build_layout
from gfa_peft.scatter import SliceSpec, scattered_op
from gfa_peft.weight_ops import op_for


def dense_slice(B, A, layout, index):
    piece = layout.modules[index]
    return (B @ A).reshape(-1)[piece.offset : piece.end].view(piece.shape)


def run_both(shapes, index, r, scale, seed, with_weight=True, dtype=torch.float64, grid="square"):
    """Output and gradients (x, B, A) of one module, fused vs dense reference, on the grid rule `grid`."""
    torch.manual_seed(seed)
    layout = build_layout([(f"m{i}", shape) for i, shape in enumerate(shapes)], grid)
    p, q = layout.modules[index].shape
    layer = nn.Linear(q, p, bias=False).to(dtype)
    op = op_for(layer)
    B = torch.randn(layout.m, r, dtype=dtype, requires_grad=True)
    A = torch.randn(r, layout.k, dtype=dtype, requires_grad=True)
    x = torch.randn(3, 2, q, dtype=dtype, requires_grad=True)
    probe = torch.randn(3, 2, p, dtype=dtype)
    weight = layer.weight if with_weight else None
    spec = SliceSpec(layout.modules[index], layout.k, scale)

    fused = scattered_op(x, op, weight, [(spec, B, A)])
    fused_grads = torch.autograd.grad((fused * probe).sum(), (x, B, A))
    effective = scale * dense_slice(B, A, layout, index) + (layer.weight if with_weight else 0)
    dense = x @ effective.T
    dense_grads = torch.autograd.grad((dense * probe).sum(), (x, B, A))
    return (fused, *fused_grads), (dense, *dense_grads)


def assert_all_close(pair, rtol=1e-10, atol=1e-10):
    for got, expected in zip(*pair):
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)


shape = st.tuples(st.integers(1, 9), st.integers(1, 9))


@settings(max_examples=150, deadline=None)
@given(
    shapes=st.lists(shape, min_size=1, max_size=5),
    data=st.data(),
    r=st.integers(1, 4),
    scale=st.floats(0.1, 3.0),
    with_weight=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_dense_reference_on_random_layouts(shapes, data, r, scale, with_weight, seed):
    index = data.draw(st.integers(0, len(shapes) - 1))
    assert_all_close(run_both(shapes, index, r, scale, seed, with_weight))


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.integers(1, 9), min_size=1, max_size=5), width=st.integers(1, 9), data=st.data(),
       r=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_matches_dense_reference_on_aligned_layouts(rows, width, data, r, seed):
    index = data.draw(st.integers(0, len(rows) - 1))
    assert_all_close(run_both([(p, width) for p in rows], index, r, 0.7, seed, grid="aligned"))


@settings(max_examples=40, deadline=None)
@given(shapes=st.lists(shape, min_size=1, max_size=4), data=st.data(), seed=st.integers(0, 2**16))
def test_float32_matches_to_round_off(shapes, data, seed):
    index = data.draw(st.integers(0, len(shapes) - 1))
    assert_all_close(run_both(shapes, index, 3, 1.0, seed, dtype=torch.float32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shapes, index, what",
    [
        ([(3, 5), (4, 4), (2, 3)], 1, "starts and ends mid-row"),  # d=37, k=6: offsets 15..31
        ([(6, 7), (1, 2), (5, 5)], 1, "smaller than one row, inside a row"),  # d=69, k=8
        ([(1, 3), (1, 2), (1, 4), (2, 2)], 2, "three modules share the first row"),  # d=13, k=3
        ([(3, 4), (2, 2)], 0, "d equals m*k, no padding"),  # d=16, k=4, m=4
        ([(4, 4), (4, 5)], 1, "last module next to the padding"),  # d=36, k=6: no padding
        ([(3, 3), (2, 2)], 1, "last module followed by padding"),  # d=13, k=3, m=5, padding=2
    ],
)
def test_edge_cases(shapes, index, what):
    layout = build_layout([(f"m{i}", s) for i, s in enumerate(shapes)])
    first_row, n_rows, skip = layout.modules[index].rows(layout.k)
    assert n_rows <= layout.m and first_row + n_rows <= layout.m, what
    assert_all_close(run_both(shapes, index, 2, 0.8, seed=7))


def test_layout_with_no_padding_is_exercised():
    layout = build_layout([("a", (4, 4)), ("b", (4, 5))])
    assert (layout.d, layout.m, layout.k, layout.padding) == (36, 6, 6, 0)


def test_padding_entries_get_no_gradient():
    # With B the identity (r = m), M = A, so A's gradient is the gradient for M itself.
    layout = build_layout([("a", (3, 3)), ("b", (2, 2))])  # d=13, k=3, m=5: the last 2 entries are padding
    assert layout.padding == 2
    B = torch.eye(layout.m, dtype=torch.float64)
    A = torch.randn(layout.m, layout.k, dtype=torch.float64, requires_grad=True)
    grad_M = torch.zeros(layout.m * layout.k, dtype=torch.float64)
    for piece in layout.modules:
        layer = nn.Linear(piece.shape[1], piece.shape[0], bias=False).double()
        out = scattered_op(torch.randn(4, piece.shape[1], dtype=torch.float64), op_for(layer), layer.weight,
                           [(SliceSpec(piece, layout.k, 1.0), B, A)])
        grad_M += torch.autograd.grad(out.sum(), A)[0].reshape(-1)
    assert torch.all(grad_M[layout.d :] == 0)
    assert torch.all(grad_M[: layout.d] != 0)


def test_backward_keeps_no_module_sized_tensor_alive():
    layout = build_layout([("a", (40, 30)), ("b", (50, 60))])
    piece = layout.modules[1]
    layer = nn.Linear(60, 50, bias=False)
    B = torch.randn(layout.m, 4, requires_grad=True)
    A = torch.randn(4, layout.k, requires_grad=True)
    x = torch.randn(2, 60, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        scattered_op(x, op_for(layer), layer.weight, [(SliceSpec(piece, layout.k, 1.0), B, A)])
    module_sized = [t for t in saved if t.numel() >= piece.numel]
    assert all(t.data_ptr() == layer.weight.data_ptr() for t in module_sized)  # only the frozen weight itself
    assert sum(t.numel() for t in saved if t.data_ptr() != layer.weight.data_ptr()) == x.numel() + B.numel() + A.numel()


class RecordProducts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.shapes.append(tuple(out.shape))
        return out


def test_full_m_by_k_product_is_never_formed():
    layout = build_layout([(f"m{i}", (16, 16)) for i in range(8)])  # d=2048, k=45, m=46
    piece = layout.modules[3]
    layer = nn.Linear(16, 16, bias=False)
    B = torch.randn(layout.m, 2, requires_grad=True)
    A = torch.randn(2, layout.k, requires_grad=True)
    with RecordProducts() as recorder:
        out = scattered_op(torch.randn(5, 16), op_for(layer), layer.weight, [(SliceSpec(piece, layout.k, 1.0), B, A)])
        out.sum().backward()
    rows_touched = piece.rows(layout.k)[1]
    products_with_k_columns = [s for s in recorder.shapes if s[-1] == layout.k]
    assert products_with_k_columns and all(s[0] <= rows_touched for s in products_with_k_columns)
    assert rows_touched < layout.m / 4
    assert math.prod((layout.m, layout.k)) not in {math.prod(s) for s in recorder.shapes}
