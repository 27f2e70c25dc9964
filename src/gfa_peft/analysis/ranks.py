"""Realized local ranks of a GFA update: what rank each module's Delta W_i actually has.

GFA learns one global pair B (m x r), A (r x k); module i adds Delta W_i = s * reshape(vec(B A)[o_i : o_i + n_i]).
The global matrix has rank at most r, but a module's window of it need not line up with the grid's rows: when
its row length q_i differs from k, consecutive rows of Delta W_i start at shifted columns of the grid, and the
reshaped slice can have rank far above r (the paper's "local rank"). Here each Delta W_i is formed by itself
from the factors (`slice_of_product`; never the whole m x k product) in float64 and described by

    norm            ||Delta W_i||_F, and its share ||Delta W_i||_F^2 / sum_j ||Delta W_j||_F^2 of the update energy
    numerical rank  #{j : sigma_j > tol * sigma_1}, the rank a per-module LoRA needs to represent Delta W_i to
                    that tolerance, at a cost of rank * (p_i + q_i) parameters
    stable rank     ||Delta W_i||_F^2 / sigma_1^2, a rank that small singular values cannot inflate
    max rank        min(p_i, q_i)

A Conv2d update (out, in, kh, kw) is taken as the (out, in * kh * kw) matrix, as the lens and LoRA see it. A zero
update (B = 0, an untrained adapter) has every rank, norm and share 0.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from gfa_peft.defaults import DEFAULT_RANK_TOL
from gfa_peft.analysis.budget import gfa_params, lora_params, nearest_multiple
from gfa_peft.layout import Layout
from gfa_peft.scatter import SliceSpec, slice_of_product

UPDATE_COPIES = 3
"""Float64 copies of one module's update alive while it is analysed: the update, and the SVD's copy and workspace."""


@dataclass(frozen=True)
class ModuleRank:
    """The realized update of one module (see the module docstring for the quantities)."""

    name: str
    shape: tuple[int, ...]
    norm: float
    energy_share: float
    numerical_rank: int
    stable_rank: float

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(p, q): the update as a matrix, q the product of the trailing dimensions."""
        return self.shape[0], math.prod(self.shape[1:])

    @property
    def max_rank(self) -> int:
        return min(self.matrix_shape)

    @property
    def lora_params(self) -> int:
        """What a LoRA pair of this module's numerical rank costs: rank * (p + q)."""
        return self.numerical_rank * sum(self.matrix_shape)

    def to_dict(self) -> dict:
        """Plain JSON keys: the fields, `matrix_shape`, `max_rank` and `lora_params`."""
        return {**asdict(self), "shape": list(self.shape), "matrix_shape": list(self.matrix_shape),
                "max_rank": self.max_rank, "lora_params": self.lora_params}


@dataclass(frozen=True)
class RankReport:
    """Every module's realized update, with the adapter's layout and its counts against LoRA's."""

    layout: Layout
    r: int
    scale: float
    tol: float
    modules: tuple[ModuleRank, ...]
    module_gain: bool = False
    """Whether the adapter has a learned gain per module (counted, and inside each module's update)."""

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Every module's update shape, in layout order."""
        return [piece.shape for piece in self.layout.modules]

    @property
    def trainable(self) -> int:
        """GFA's trainable count r * (m + k) (plus N with module gains)."""
        return gfa_params(self.layout, self.r, self.module_gain)

    @property
    def lora_rank_same_budget(self) -> int | None:
        """The LoRA rank whose count is nearest GFA's (ties to the smaller); None when that is below rank 1."""
        return nearest_multiple(self.trainable, lora_params(self.shapes, 1)) or None

    @property
    def zero(self) -> bool:
        """Whether the update is exactly zero (B = 0: an untrained adapter)."""
        return all(module.norm == 0 for module in self.modules)

    @property
    def lora_params_to_realize(self) -> int:
        """What LoRA needs to give every module its realized rank: sum_i rank_i * (p_i + q_i)."""
        return sum(module.lora_params for module in self.modules)

    def to_dict(self) -> dict:
        """Plain JSON: the layout and counts, one record per module in layout order, and a summary."""
        ranks = [module.numerical_rank for module in self.modules]
        lora_rank = self.lora_rank_same_budget
        return {
            "N": len(self.modules),
            "d": self.layout.d,
            "m": self.layout.m,
            "k": self.layout.k,
            "padding": self.layout.padding,
            "r": self.r,
            "scale": self.scale,
            "module_gain": self.module_gain,
            "tol": self.tol,
            "trainable": self.trainable,
            "lora_params_same_rank": lora_params(self.shapes, self.r),
            "lora_params_rank1": lora_params(self.shapes, 1),
            "lora_rank_same_budget": lora_rank,
            "lora_params_same_budget": lora_params(self.shapes, lora_rank) if lora_rank else None,
            "zero_update": self.zero,
            "modules": [module.to_dict() for module in self.modules],
            "summary": {
                "max_numerical_rank": max(ranks),
                "median_numerical_rank": statistics.median(ranks),
                "modules_above_r": sum(rank > self.r for rank in ranks),
                "total_norm": math.sqrt(sum(module.norm**2 for module in self.modules)),
                "lora_params_to_realize": self.lora_params_to_realize,
            },
        }


def check_updates_fit(layout: Layout, memory: int | None = None) -> None:
    """Raise ValueError, before anything is allocated, when a module's update would not fit in `memory` bytes
    (default: this machine's) while it is analysed in float64: a saved layout can claim any sizes, and only the
    factors, not the modules, are in the file."""
    memory = _physical_memory() if memory is None else memory
    for piece in layout.modules:
        needed = UPDATE_COPIES * 8 * piece.numel
        if needed > memory:
            raise ValueError(f"module {piece.name!r} claims an update of shape {list(piece.shape)}, "
                             f"{needed / 1e9:.3g} GB to analyse, more than the {memory / 1e9:.3g} GB of memory")


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # a platform without these names: no limit known
        return 2**63


def module_update(B: Tensor, A: Tensor, layout: Layout, name: str, scale: float) -> Tensor:
    """Delta W_i = scale * slice_i(B A) as a (p, q) float64 matrix, forming only the grid rows it touches."""
    spec = SliceSpec(layout[name], layout.k, scale)
    update = slice_of_product(B.detach().double(), A.detach().double(), spec)
    return update.reshape(update.shape[0], -1)


def rank_profile(update: Tensor, tol: float = DEFAULT_RANK_TOL) -> tuple[float, int, float]:
    """(Frobenius norm, numerical rank at relative tolerance `tol`, stable rank) of a matrix; all 0 for zero."""
    sigma = torch.linalg.svdvals(update)
    energy = float((sigma**2).sum())
    if energy == 0:
        return 0.0, 0, 0.0
    top = float(sigma[0])
    return math.sqrt(energy), int((sigma > tol * top).sum()), energy / top**2


def realized_ranks(
    B: Tensor, A: Tensor, layout: Layout, scale: float, tol: float = DEFAULT_RANK_TOL, progress: bool = False,
    gains: Tensor | None = None,
) -> RankReport:
    """The realized update of every module of a GFA adapter with factors B (m x r), A (r x k) on `layout`, each
    module's slice times `scale` (and times its gain, for an adapter with module gains: `gains`, in layout order).

    Raises ValueError when the factors do not fit the layout or `tol` is outside (0, 1).
    """
    if B.dim() != 2 or A.dim() != 2 or B.shape[0] != layout.m or A.shape[1] != layout.k or B.shape[1] != A.shape[0]:
        raise ValueError(
            f"factors B {list(B.shape)} and A {list(A.shape)} do not fit the layout's {layout.m} x {layout.k} grid"
        )
    if not 0 < tol < 1:
        raise ValueError(f"the rank tolerance must be in (0, 1), got {tol}")
    check_updates_fit(layout)
    scales = [scale] * len(layout.modules) if gains is None else [scale * float(gain) for gain in gains]
    profiles = [
        (piece, *rank_profile(module_update(B, A, layout, piece.name, module_scale), tol))
        for piece, module_scale in tqdm(zip(layout.modules, scales, strict=True), total=len(scales),
                                        desc="module spectra", unit="module", disable=not progress)
    ]
    energy = sum(norm**2 for _, norm, _, _ in profiles)
    modules = tuple(
        ModuleRank(piece.name, piece.shape, norm, norm**2 / energy if energy else 0.0, rank, stable)
        for piece, norm, rank, stable in profiles
    )
    return RankReport(layout=layout, r=B.shape[1], scale=scale, tol=tol, modules=modules,
                      module_gain=gains is not None)
