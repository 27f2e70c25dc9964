"""The scatter: each module's update is its slice of vec(B A), and only the rows of B A that
intersect the slice are ever formed.

A module's window of the row-major m x k matrix splits into at most three rectangular segments:
the tail of its first row, a block of whole rows, and the head of its last row. Every product
below is one GEMM per segment, written straight into (or read straight from) the module-shaped
buffer, so no row-padded copy of the slice is ever made.

`ScatteredOp` runs a layer with the effective weight W + sum_a s_a * slice_a(B_a A_a) without
keeping that module-sized weight alive for backward: the backward pass recomputes it, and turns
the weight gradient g^T x into gradients for the touched rows of B and for A.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gfa_peft.internals import run_after_backward
from gfa_peft.layout import ModuleSlice
from gfa_peft.weight_ops import WeightOp


@dataclass(frozen=True)
class SliceSpec:
    """Where one adapter's update for one module sits in its m x k grid, and its scale s."""

    piece: ModuleSlice
    k: int
    scale: float


@dataclass(frozen=True)
class Segment:
    """Rows [row, row + n_rows) x columns [col, col + n_cols) of the grid, stored at
    [start, start + n_rows * n_cols) of the module's flattened update."""

    row: int
    n_rows: int
    col: int
    n_cols: int
    start: int

    def of(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.start : self.start + self.n_rows * self.n_cols].view(self.n_rows, self.n_cols)


def segments(spec: SliceSpec) -> list[Segment]:
    """The module's window as: the rest of its first row, whole rows, the start of its last row."""
    k, numel = spec.k, spec.piece.numel
    row, skip = divmod(spec.piece.offset, k)
    parts, start = [], 0
    if skip:
        head = min(k - skip, numel)
        parts.append(Segment(row, 1, skip, head, 0))
        row, start = row + 1, head
    whole_rows = (numel - start) // k
    if whole_rows:
        parts.append(Segment(row, whole_rows, 0, k, start))
        row, start = row + whole_rows, start + whole_rows * k
    if start < numel:
        parts.append(Segment(row, 1, 0, numel - start, start))
    return parts


def add_slice(
    out: torch.Tensor, base: torch.Tensor | None, B: torch.Tensor, A: torch.Tensor, spec: SliceSpec
) -> torch.Tensor:
    """out = base + s * slice(B A) (or s * slice(B A) without base), one GEMM per segment."""
    out_flat = out.view(-1)
    base_flat = out_flat if base is None else base.reshape(-1)
    B, A = B.to(out.dtype), A.to(out.dtype)
    for seg in segments(spec):
        torch.addmm(
            seg.of(base_flat),
            B[seg.row : seg.row + seg.n_rows],
            A[:, seg.col : seg.col + seg.n_cols],
            beta=0 if base is None else 1,
            alpha=spec.scale,
            out=seg.of(out_flat),
        )
    return out


def slice_of_product(B: torch.Tensor, A: torch.Tensor, spec: SliceSpec) -> torch.Tensor:
    """s * reshape(vec(B A)[offset : offset + numel], shape), forming only the rows it touches."""
    return add_slice(B.new_empty(spec.piece.shape), None, B, A, spec)


def weight_plus_update(weight: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """W + update in W's dtype, as a merge writes it: added in float32 when W is fp16/bf16 (one rounding; a 16-bit
    sum would round the update first), in W's own dtype otherwise, so a float64 weight stays float64 throughout
    as in PEFT's LoRA merge."""
    dtype = torch.float32 if weight.dtype.itemsize < 4 else weight.dtype
    return (weight.to(dtype) + update.to(dtype)).to(weight.dtype)


def add_factor_grads(
    grad_B: torch.Tensor, grad_A: torch.Tensor, grad_delta: torch.Tensor, B: torch.Tensor, A: torch.Tensor, spec: SliceSpec
) -> None:
    """Accumulate the gradients of <grad_delta, s * slice(B A)> into grad_B (rows touched) and grad_A.

    Grid entries outside the slice (other modules, padding) contribute nothing. The products run in the more
    precise of the gradient's and the factors' dtypes (the dtype of grad_B and grad_A): a bf16/fp16 weight
    gradient is projected onto float32 factors in float32, so small factors are not rounded to 16 bits.
    """
    flat = grad_delta.reshape(-1).to(grad_B.dtype)
    B, A = B.to(grad_B.dtype), A.to(grad_B.dtype)
    for seg in segments(spec):
        rows, cols = slice(seg.row, seg.row + seg.n_rows), slice(seg.col, seg.col + seg.n_cols)
        grad = seg.of(flat)
        grad_B[rows].addmm_(grad, A[:, cols].T, alpha=spec.scale)
        grad_A[:, cols].addmm_(B[rows].T, grad, alpha=spec.scale)


class BackwardWorkspace(threading.local):
    """Per-thread scratch memory for the module-sized tensors of a backward pass, on the CPU.

    A CPU allocation of more than 32 MB is served by a fresh mmap that page-faults on first touch
    (about as slow as the arithmetic it holds), and each adapted module needs two such tensors in
    backward: its effective weight, then its weight gradient. One flat buffer per dtype, grown to
    the largest module, serves them all and is released when the backward pass ends. The price:
    where a step's memory peaks inside the backward rather than at the end of the forward, the
    buffer is part of that peak (Llama widths, all-linear: one 8,192 x 3,072 weight, 1.20x LoRA's
    step memory; docs/bench.md). A view's contents never outlive the call that fills it. On
    accelerators the caching allocator already reuses memory, so views there are plain allocations.
    """

    def __init__(self):
        self.flat: dict[torch.dtype, torch.Tensor] = {}

    def buffer(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        if not self.flat:
            run_after_backward(self.flat.clear)
        numel = math.prod(shape)
        if dtype not in self.flat or self.flat[dtype].numel() < numel:
            self.flat[dtype] = torch.empty(numel, dtype=dtype, device=device)
        return self.flat[dtype][:numel].view(shape)


WORKSPACE = BackwardWorkspace()


def formed_in(base_weight: torch.Tensor | None, factors: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype `effective_weight` adds in: W's, or without W the factors' (the update keeps its own precision)."""
    return factors[0].dtype if base_weight is None else base_weight.dtype


def effective_weight(
    base_weight: torch.Tensor | None,
    specs: Sequence[SliceSpec],
    factors: Sequence[torch.Tensor],
    like: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """W + sum_a s_a * slice_a in W's dtype; without W, the sum of the scaled slices alone, formed in the
    factors' dtype and then given the dtype of `like` (the input or its gradient) where that is floating.
    Formed into `weight` when given (of dtype `formed_in(base_weight, factors)`)."""
    if weight is None:
        weight = torch.empty(specs[0].piece.shape, dtype=formed_in(base_weight, factors), device=factors[0].device)
    base = base_weight
    for spec, B, A in zip(specs, factors[0::2], factors[1::2]):
        add_slice(weight, base, B, A, spec)
        base = weight
    if base_weight is None and like.is_floating_point():
        return weight.to(like.dtype)
    return weight


class ScatteredOp(torch.autograd.Function):
    """op(x, W + sum_a s_a * slice_a(B_a A_a)) with gradients for x, every B_a, A_a, and W where it trains.

    `base_weight` may be None, in which case the op runs with the scattered update alone (used
    when adapter dropout feeds the update a different input than the frozen weight, and where the
    op multiplies in 16 bits, which would round a small update away inside W + update).
    """

    @staticmethod
    def forward(ctx, x, op: WeightOp, base_weight, specs: Sequence[SliceSpec], *factors):
        ctx.op, ctx.specs = op, specs
        ctx.save_for_backward(x, base_weight, *factors)
        return op.forward(x, effective_weight(base_weight, specs, factors, x))

    @staticmethod
    def backward(ctx, grad_out):
        x, base_weight, *factors = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            buffer = WORKSPACE.buffer(ctx.specs[0].piece.shape, formed_in(base_weight, factors), grad_out.device)
            weight = effective_weight(base_weight, ctx.specs, factors, grad_out, buffer)
            grad_x = ctx.op.grad_input(grad_out, x, weight.to(grad_out.dtype)).to(x.dtype)
        factor_grads: list[torch.Tensor | None] = [None] * len(factors)
        grad_base = None
        base_trains, factors_train = ctx.needs_input_grad[2], any(ctx.needs_input_grad[4:])
        if base_trains or factors_train:
            # d(W + update) / dW is the identity: a base weight that trains (unfrozen by the user) gets the weight
            # gradient itself, so that gradient then needs memory of its own rather than the shared workspace.
            shape = ctx.specs[0].piece.shape
            grad_weight = (torch.empty(shape, dtype=grad_out.dtype, device=grad_out.device) if base_trains
                           else WORKSPACE.buffer(shape, grad_out.dtype, grad_out.device))
            ctx.op.grad_weight(grad_out, x.to(grad_out.dtype) if x.is_floating_point() else x, out=grad_weight)
            if base_trains:
                grad_base = grad_weight.to(base_weight.dtype)
            for index, spec in enumerate(ctx.specs if factors_train else ()):
                B, A = factors[2 * index], factors[2 * index + 1]
                precise = torch.promote_types(grad_weight.dtype, B.dtype)
                grad_B, grad_A = torch.zeros_like(B, dtype=precise), torch.zeros_like(A, dtype=precise)
                add_factor_grads(grad_B, grad_A, grad_weight, B, A, spec)
                factor_grads[2 * index], factor_grads[2 * index + 1] = grad_B.to(B.dtype), grad_A.to(A.dtype)
        return (grad_x, None, grad_base, None, *factor_grads)


def scattered_op(
    x: torch.Tensor,
    op: WeightOp,
    base_weight: torch.Tensor | None,
    adapters: Sequence[tuple[SliceSpec, torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Run `op` with the base weight plus the scattered updates of the given (spec, B, A)."""
    specs = tuple(spec for spec, _, _ in adapters)
    factors = [tensor for _, B, A in adapters for tensor in (B, A)]
    return ScatteredOp.apply(x, op, base_weight, specs, *factors)
