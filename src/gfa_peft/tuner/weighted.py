"""Combine GFA adapters of one layout into one adapter, without forming any m x k product.

A weighted sum of GFA updates on one layout is itself a GFA update: with B = [c_1 B_1, ..., c_n B_n]
(m x sum r_i) and A = [A_1; ...; A_n] (sum r_i x k), B A = sum_i c_i B_i A_i, and every module's
slice of it is the same weighted sum of the modules' slices. Recompressing to a lower rank goes
through QR factorisations of B and A^T and an SVD of the small core between them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def concatenated_factors(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], coefficients: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B A = sum_i coefficients[i] * B_i A_i exactly, in float64."""
    B = torch.cat([c * B_i.double() for (B_i, _), c in zip(pairs, coefficients)], dim=1)
    A = torch.cat([A_i.double() for _, A_i in pairs], dim=0)
    return B, A


def truncated_factors(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (m x rank, rank x k) of the best rank-`rank` approximation of B A (Eckart-Young).

    B A = Q_B (R_B R_A^T) Q_A^T with B = Q_B R_B and A^T = Q_A R_A; the SVD U S V^T of the small
    core gives B A = (Q_B U) S (Q_A V)^T. The leading `rank` singular triplets are kept, S split
    evenly between the factors (sqrt(S) on each side) so neither factor dwarfs the other when
    training continues. The squared Frobenius error is the sum of the discarded S^2.
    """
    Q_B, R_B = torch.linalg.qr(B)
    Q_A, R_A = torch.linalg.qr(A.T)
    U, S, Vh = torch.linalg.svd(R_B @ R_A.T)
    root = S[:rank].sqrt()
    return (Q_B @ U[:, :rank]) * root, root[:, None] * (Vh[:rank] @ Q_A.T)
