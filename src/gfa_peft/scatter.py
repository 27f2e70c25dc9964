"""The scatter: each module's update is its slice of vec(B A), and only the rows of B A that
intersect the slice are ever formed.

`ScatteredOp` runs a layer with the effective weight W + sum_a s_a * slice_a(B_a A_a) without
keeping that module-sized weight alive for backward: the backward pass recomputes it, and turns
the weight gradient g^T x into gradients for the rows of B and for A.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gfa_peft.layout import ModuleSlice
from gfa_peft.weight_ops import WeightOp


@dataclass(frozen=True)
class SliceSpec:
    """Where one adapter's update for one module sits in its m x k grid, and its scale s."""

    piece: ModuleSlice
    k: int
    scale: float


def slice_of_product(B: torch.Tensor, A: torch.Tensor, spec: SliceSpec) -> torch.Tensor:
    """reshape(vec(B A)[offset : offset + numel], shape), forming only the rows it touches."""
    first_row, n_rows, skip = spec.piece.rows(spec.k)
    rows = B[first_row : first_row + n_rows] @ A
    return rows.view(-1)[skip : skip + spec.piece.numel].view(spec.piece.shape)


def factor_grads(
    grad_delta: torch.Tensor, B: torch.Tensor, A: torch.Tensor, spec: SliceSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of <grad_delta, slice_of_product(B, A)> for the touched rows of B, and for A.

    Entries of those rows that belong to other modules or to the padding get zero gradient.
    """
    first_row, n_rows, skip = spec.piece.rows(spec.k)
    flat = grad_delta.reshape(-1)
    if skip == 0 and flat.numel() == n_rows * spec.k:
        rows_grad = flat.view(n_rows, spec.k)
    else:
        rows_grad = flat.new_zeros(n_rows * spec.k)
        rows_grad[skip : skip + flat.numel()] = flat
        rows_grad = rows_grad.view(n_rows, spec.k)
    return rows_grad @ A.T, B[first_row : first_row + n_rows].T @ rows_grad


def effective_weight(
    base_weight: torch.Tensor | None,
    specs: Sequence[SliceSpec],
    factors: Sequence[torch.Tensor],
    dtype: torch.dtype,
) -> torch.Tensor:
    """W + sum_a s_a * slice_a, or just the sum of the scaled slices when there is no W."""
    weight = base_weight
    for spec, B, A in zip(specs, factors[0::2], factors[1::2]):
        delta = slice_of_product(B, A, spec).to(dtype)
        weight = delta * spec.scale if weight is None else torch.add(weight, delta, alpha=spec.scale)
    return weight


class ScatteredOp(torch.autograd.Function):
    """op(x, W + sum_a s_a * slice_a(B_a A_a)) with gradients for x and every B_a, A_a.

    `base_weight` may be None, in which case the op runs with the scattered update alone (used
    when adapter dropout feeds the update a different input than the frozen weight).
    """

    @staticmethod
    def forward(ctx, x, op: WeightOp, base_weight, specs: Sequence[SliceSpec], *factors):
        dtype = x.dtype if base_weight is None else base_weight.dtype
        weight = effective_weight(base_weight, specs, factors, dtype)
        ctx.op, ctx.specs, ctx.dtype = op, specs, dtype
        ctx.save_for_backward(x, base_weight, *factors)
        return op.forward(x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, base_weight, *factors = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = effective_weight(base_weight, ctx.specs, factors, ctx.dtype)
            grad_x = ctx.op.grad_input(grad_out, x, weight.to(grad_out.dtype)).to(x.dtype)
        factor_grads_out: list[torch.Tensor | None] = [None] * len(factors)
        if any(ctx.needs_input_grad[4:]):
            x_matched = x.to(grad_out.dtype) if x.is_floating_point() else x
            grad_weight = ctx.op.grad_weight(grad_out, x_matched)
            for index, spec in enumerate(ctx.specs):
                B, A = factors[2 * index], factors[2 * index + 1]
                if not (ctx.needs_input_grad[4 + 2 * index] or ctx.needs_input_grad[5 + 2 * index]):
                    continue
                grad_B_rows, grad_A = factor_grads(grad_weight.to(B.dtype) * spec.scale, B, A, spec)
                first_row, n_rows, _ = spec.piece.rows(spec.k)
                grad_B = torch.zeros_like(B)
                grad_B[first_row : first_row + n_rows] = grad_B_rows
                factor_grads_out[2 * index], factor_grads_out[2 * index + 1] = grad_B, grad_A
        return (grad_x, None, None, None, *factor_grads_out)


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
