"""Spectra as the lens needs them: tail energies of a matrix, dense for module updates, randomized for M*."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from gfa_peft.defaults import DEFAULT_RTOL

@dataclass(frozen=True)
class Spectrum:
    """The leading squared singular values of a p x q matrix X, enough to give its tail energies.

    `squares` holds sigma_1^2 >= sigma_2^2 >= ... up to some rank n (all min(p, q) of them when `complete`);
    `total` is ||X||_F^2. `head_error[j]` bounds how much the first j + 1 squares undershoot the true ones
    (zero for a dense, complete spectrum), so every tail is known to within `tail_error`.
    """

    shape: tuple[int, int]
    squares: Tensor
    total: float
    head_error: Tensor
    iterations: int = 0

    @property
    def complete(self) -> bool:
        return len(self.squares) == min(self.shape)

    @property
    def rank_cost(self) -> int:
        """Trainable parameters one unit of rank costs: p + q (a LoRA pair, or GFA's B and A columns)."""
        return sum(self.shape)

    @property
    def known_rank(self) -> int:
        """The highest rank whose tail this spectrum knows."""
        return min(self.shape) if self.complete else len(self.squares)

    def tail(self, r: int) -> float:
        """sum_{j > r} sigma_j^2: the squared error of the best rank-r approximation (an upper bound when
        the spectrum is randomized; the true value is at least `tail(r) - tail_error(r)`)."""
        self._check_rank(r)
        if self.complete:  # summing the tail itself keeps tiny tails exact instead of a difference of big numbers
            return float(self.squares[r:].sum())
        return max(self.total - float(self.squares[:r].sum()), 0.0)

    def tail_error(self, r: int) -> float:
        """How much `tail(r)` may overstate the true tail."""
        self._check_rank(r)
        return float(self.head_error[r - 1]) if 0 < r <= len(self.head_error) else 0.0

    def _check_rank(self, r: int) -> None:
        if not 0 <= r <= self.known_rank:
            raise ValueError(f"rank {r} is outside the computed spectrum (ranks 0..{self.known_rank})")


def dense_spectrum(matrix: Tensor) -> Spectrum:
    """The complete spectrum of a matrix small enough to decompose densely (reshaped to (p, prod(rest))).

    The squares are the eigenvalues of the smaller Gram matrix in float64: their absolute errors are about
    eps * sigma_1^2, the accuracy sums of squares need, and this is several times faster than an SVD.
    """
    matrix = matrix.reshape(matrix.shape[0], -1).double()
    gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    squares = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
    return Spectrum(
        shape=tuple(matrix.shape),
        squares=squares,
        total=float(squares.sum()),
        head_error=torch.zeros_like(squares),
    )


def top_singular_values(
    matrix: Tensor,
    n: int,
    *,
    rtol: float = DEFAULT_RTOL,
    oversample: int | None = None,
    max_iters: int = 50,
    seed: int = 0,
    progress: bool = False,
) -> Spectrum:
    """The top n singular values of a large m x k matrix, by randomized subspace iteration.

    A block of n + oversample Gaussian vectors is pushed through M M^T repeatedly (re-orthonormalized each
    time); after each pass the Rayleigh-Ritz step on the block gives Ritz triples (u_j, s_j, v_j) with
    M^T u_j = s_j v_j exactly. Two facts make the result checkable:

    - s_j <= sigma_j (interlacing: the s_j are the singular values of Q^T M for an orthonormal Q), so the
      captured head never exceeds the true one and the tail ||M||_F^2 - sum_{j<=r} s_j^2 never understates it;
    - with rho_j = ||M v_j - s_j u_j||, some singular value lies within rho_j / sqrt(2) of s_j (the residual of
      the symmetric [[0, M], [M^T, 0]] at (u_j; v_j) / sqrt(2)). Taking it to be sigma_j - which fails only
      if the random block missed a top singular direction altogether - bounds the head's shortfall by
      sum_{j<=r} (2 s_j delta_j + delta_j^2), delta_j = rho_j / sqrt(2).

    Iteration stops once that bound for r = n is at most rtol * ||M||_F^2 (or after max_iters; the bound
    reached is reported either way). The default oversampling, max(10, n), doubles the block: each pass costs
    more, but the Ritz values converge like (sigma_{n + oversample} / sigma_j)^(2 * pass), which matters where
    the top of the spectrum is flat. Products run in M's dtype (M is never copied); energies, the
    orthonormalization and the small decompositions in float64. When the block would span a large part of
    the matrix anyway, the complete dense spectrum is cheaper and exact, and is returned instead.
    """
    rows, columns = matrix.shape
    n = min(n, rows, columns)
    width = min(n + (max(10, n) if oversample is None else oversample), rows, columns)
    if 2 * width >= min(rows, columns):
        return dense_spectrum(matrix)
    total = _energy(matrix)
    if n == 0:
        nothing = torch.zeros(0, dtype=torch.float64)
        return Spectrum((rows, columns), nothing, total, nothing)
    generator = torch.Generator().manual_seed(seed)
    basis = _orthonormal(matrix @ torch.randn(columns, width, generator=generator, dtype=matrix.dtype), matrix.dtype)
    passes = tqdm(range(1, max_iters + 1), desc="global spectrum", disable=not progress, leave=False)
    for iteration in passes:
        # Rayleigh-Ritz: Q^T M = U_s S V^T through a QR of M^T Q, so only width x width matrices are decomposed.
        right_basis, triangle = torch.linalg.qr((matrix.T @ basis).double())
        small_left, values, small_right_t = torch.linalg.svd(triangle.T)
        right = right_basis @ small_right_t.T
        left = basis.double() @ small_left
        image = (matrix @ right.to(matrix.dtype)).double()
        residual = torch.linalg.vector_norm(image[:, :n] - left[:, :n] * values[:n], dim=0)
        drift = residual / math.sqrt(2)
        head_error = torch.cumsum(2 * values[:n] * drift + drift**2, 0)
        passes.set_postfix(bound=f"{float(head_error[-1]) / total:.1e}", target=f"{rtol:.0e}")
        if head_error[-1] <= rtol * total:
            break
        basis = _orthonormal(image, matrix.dtype)  # M M^T Q up to a rotation: the next block
    return Spectrum((rows, columns), values[:n] ** 2, total, head_error, iterations=iteration)


def _energy(matrix: Tensor) -> float:
    """||M||_F^2 accumulated in float64 a block of rows at a time: a float64 copy of all of M could be too big."""
    return sum(float(rows.double().square().sum()) for rows in matrix.split(1024))


def _orthonormal(block: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.linalg.qr(block.double()).Q.to(dtype)

