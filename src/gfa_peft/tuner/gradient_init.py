"""A gradient-informed start for GFA: A from the top right singular vectors of the first batches' gradient.

At B = 0 the update is exactly zero and B's gradient is s * G A^T, where G is the loss gradient of the update
viewed m x k (the target modules' weight gradients, concatenated in the layout's order). Drawn at random, A
catches a random share of G's energy; set to the top-r right singular vectors of G, B's first steps follow the
directions in which the loss falls fastest (the LoRA-GA / LoRA-One idea, on GFA's grid). B stays 0, so the
update still starts at exactly zero.

G is never formed. GFA's own backward pass gives the two products a randomized SVD needs, at an update of zero:
with B = 0 and A = Omega^T, B's gradient is s * G Omega; with B = Q and A = 0, A's gradient is s * Q^T G. Each
costs one forward and backward over the batches and memory of the factors' size (plus one module's weight
gradient, as in training).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def init_from_gradient(
    tuner: nn.Module,
    losses: Callable[[], Iterable[torch.Tensor]],
    adapter_name: str = "default",
    oversample: int = 8,
    power_iterations: int = 1,
) -> torch.Tensor:
    """Set adapter `adapter_name`'s A to the top-r right singular vectors of the gradient G and B to 0.

    `tuner` is the `GfaModel` (`peft_model.base_model`). `losses()` yields the losses of the same batches each
    time it is called (run it with dropout off, so every pass sees the same G); each loss is backpropagated.
    Other trainable parameters get gradients during the passes, which are cleared. Returns G's top singular
    values as estimated (r + `oversample` of them), largest first (the passes see s * G; s is divided out).
    """
    B_factor, A_factor = tuner.gfa_B[adapter_name], tuner.gfa_A[adapter_name]
    (m, rank), k = B_factor.weight.shape, A_factor.weight.shape[1]
    dtype, device = A_factor.weight.dtype, A_factor.weight.device
    work = {"dtype": torch.promote_types(dtype, torch.float32), "device": device}  # fp16/bf16 factors: SVD in fp32
    width = min(rank + oversample, m, k)
    trainability = B_factor.weight.requires_grad, A_factor.weight.requires_grad

    def gradient(B: torch.Tensor, A: torch.Tensor, of: nn.Module) -> torch.Tensor:
        """The gradient of the summed losses for the factor `of`, at factors (B, A), whose product is 0."""
        B_factor.weight = nn.Parameter(B.to(dtype), requires_grad=of is B_factor)
        A_factor.weight = nn.Parameter(A.to(dtype), requires_grad=of is A_factor)
        for loss in losses():
            loss.backward()
        found = of.weight.grad
        tuner.zero_grad(set_to_none=True)  # the head's and others' gradients of these passes are not a step's
        return torch.zeros(of.weight.shape, **work) if found is None else found.to(work["dtype"])

    def left_range(right: torch.Tensor) -> torch.Tensor:
        """An orthonormal basis of G's range seen through `right` (k x width): Q of s * G @ right."""
        return torch.linalg.qr(gradient(torch.zeros(m, width, **work), right.T, B_factor)).Q

    def through_left(left: torch.Tensor) -> torch.Tensor:
        """s * left^T G (width x k)."""
        return gradient(left, torch.zeros(width, k, **work), A_factor)

    basis = left_range(torch.randn(k, width, **work))
    for _ in range(power_iterations):  # sharpens the basis toward the top singular directions
        basis = left_range(torch.linalg.qr(through_left(basis).T).Q)
    _, scaled_values, right_vectors = torch.linalg.svd(through_left(basis), full_matrices=False)
    # Orthonormal rows have unit norm, as A's rows have in expectation at the default sigma = 1/sqrt(k).
    B_factor.weight = nn.Parameter(torch.zeros(m, rank, dtype=dtype, device=device), requires_grad=trainability[0])
    A_factor.weight = nn.Parameter(right_vectors[:rank].to(dtype).contiguous(), requires_grad=trainability[1])
    return scaled_values / tuner.peft_config[adapter_name].effective_scale
