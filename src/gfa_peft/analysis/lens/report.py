"""Both budgeted errors side by side: E_GFA(P) from the global matrix M*, E_LoRA(P) from the module spectra,
the verdict at every budget and the budgets where it changes."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from gfa_peft.layout import Layout
from gfa_peft.analysis.lens.lora import LoraProblem
from gfa_peft.defaults import DEFAULT_RTOL, DEFAULT_TIE_TOLERANCE
from gfa_peft.analysis.lens.spectrum import Spectrum, dense_spectrum, top_singular_values

Favoured = str
"""The verdict at a budget: "gfa", "lora" or "tie"."""


def global_matrix(deltas: Mapping[str, Tensor], layout: Layout) -> Tensor:
    """M*: the module updates flattened in the layout's order, concatenated, zero-padded and viewed m x k.

    `deltas` maps module names to updates in GFA's (out, in, ...) orientation; they must be exactly the
    layout's modules with the layout's shapes. The matrix is at least float32 (wider inputs stay wider).
    """
    _check_against_layout(deltas, layout)
    dtype = torch.promote_types(torch.float32, next(iter(deltas.values())).dtype)
    flat = torch.zeros(layout.m * layout.k, dtype=dtype)
    for piece in layout.modules:
        flat[piece.offset : piece.end] = deltas[piece.name].reshape(-1)
    return flat.view(layout.m, layout.k)


def _check_against_layout(deltas: Mapping[str, Tensor], layout: Layout) -> None:
    missing = [name for name in layout.names if name not in deltas]
    extra = [name for name in deltas if name not in set(layout.names)]
    if missing or extra:
        raise ValueError(
            f"the updates do not match the layout: missing {missing or 'none'}, not in the layout {extra or 'none'}"
        )
    for piece in layout.modules:
        if tuple(deltas[piece.name].shape) != piece.shape:
            raise ValueError(
                f"update of {piece.name!r} has shape {list(deltas[piece.name].shape)}, "
                f"the layout expects {list(piece.shape)}"
            )


def global_spectrum(
    deltas: Mapping[str, Tensor],
    layout: Layout,
    max_budget: int,
    *,
    rtol: float = DEFAULT_RTOL,
    seed: int = 0,
    progress: bool = False,
) -> Spectrum:
    """The spectrum of M* as far as budgets up to `max_budget` need it: r_max = max_budget // (m + k)."""
    top = max_budget // (layout.m + layout.k)
    return top_singular_values(global_matrix(deltas, layout), top, rtol=rtol, seed=seed, progress=progress)


def module_spectra(deltas: Mapping[str, Tensor], progress: bool = False) -> dict[str, Spectrum]:
    """The complete spectrum of every module update, each seen as (p, prod(rest))."""
    items = tqdm(deltas.items(), desc="module spectra", disable=not progress)
    return {name: dense_spectrum(delta) for name, delta in items}


def gfa_error(spectrum: Spectrum, budget: int) -> tuple[float, int]:
    """E_GFA(P) for the spectrum of M*, and the rank attaining it: the largest r with r (m + k) <= P (at most
    min(m, k)); the tail only shrinks as r grows."""
    rank = min(budget // spectrum.rank_cost, min(spectrum.shape))
    return spectrum.tail(rank), rank


def feasible_floor(layout: Layout) -> tuple[int, str]:
    """The smallest budget at which either class has a nonzero rank, min(m + k, min_i (p_i + q_i)), and a
    sentence saying where it comes from."""
    cheapest = min(layout.modules, key=lambda piece: _rank_cost(piece.shape))
    gfa_floor, lora_floor = layout.m + layout.k, _rank_cost(cheapest.shape)
    return min(gfa_floor, lora_floor), (
        f"GFA rank 1 costs m + k = {gfa_floor:,}; LoRA rank 1 on the cheapest module {cheapest.name!r} "
        f"costs p + q = {lora_floor:,}"
    )


def check_budgets(budgets: Iterable[int], layout: Layout) -> list[int]:
    """The budgets sorted and deduplicated; ValueError naming the smallest feasible budget if one is below it."""
    budgets = sorted({int(budget) for budget in budgets})
    if not budgets:
        raise ValueError("no budgets to evaluate")
    floor, why = feasible_floor(layout)
    if budgets[0] < floor:
        raise ValueError(f"budget {budgets[0]:,} is below the smallest feasible budget {floor:,} ({why})")
    return budgets


def _rank_cost(shape: tuple[int, ...]) -> int:
    return shape[0] + math.prod(shape[1:])


@dataclass(frozen=True)
class BudgetRecord:
    """Both classes at one budget. Errors are squared Frobenius norms; the *_rel ones are divided by ||Delta*||^2.

    e_lora is the exact optimum with per-module `lora_ranks` (costing `lora_cost`), e_lora_greedy the greedy
    allocation's error, e_lora_equal the error at LoRA's usual equal rank `lora_equal_rank`. The true E_GFA lies
    in [e_gfa - gfa_error_bound, e_gfa]. `favoured` is "tie" when |e_gfa - e_lora| <= tie_band.
    """

    budget: int
    e_gfa: float
    e_lora: float
    e_lora_greedy: float
    e_lora_equal: float
    e_gfa_rel: float
    e_lora_rel: float
    e_lora_greedy_rel: float
    e_lora_equal_rel: float
    gfa_rank: int
    gfa_error_bound: float
    lora_ranks: dict[str, int]
    lora_cost: int
    lora_equal_rank: int
    tie_band: float
    favoured: Favoured


@dataclass(frozen=True)
class Crossover:
    """A budget where the favoured class changes: `before` is favoured at `budget - 1` but not at `budget`,
    and the next evaluated budget that is not a tie favours `after`."""

    budget: int
    before: Favoured
    after: Favoured


@dataclass(frozen=True)
class LensReport:
    """The lens at every budget. `gfa_spectrum_*` say how much of M*'s spectrum was computed (rank), how
    (power iterations; 0 means a dense decomposition) and how well (the head-energy error bound at that rank)."""

    total_energy: float
    d: int
    m: int
    k: int
    gfa_spectrum_rank: int
    gfa_spectrum_iterations: int
    gfa_spectrum_error_bound: float
    tie_tolerance: float
    records: list[BudgetRecord]
    crossovers: list[Crossover]

    def to_dict(self) -> dict:
        """Plain JSON: the records under `budgets`, a crossover's classes under `from` and `to`."""
        data = asdict(self)
        data["budgets"] = data.pop("records")
        data["crossovers"] = [{"budget": c.budget, "from": c.before, "to": c.after} for c in self.crossovers]
        return data


def lens_report(
    deltas: Mapping[str, Tensor],
    layout: Layout,
    budgets: Iterable[int],
    *,
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE,
    rtol: float = DEFAULT_RTOL,
    seed: int = 0,
    progress: bool = False,
) -> LensReport:
    """E_GFA and E_LoRA (exact, greedy and equal-rank) at every budget, the verdicts and the crossovers.

    The verdict is a tie when the two errors differ by at most the tie band: `tie_tolerance` * ||Delta*||^2,
    or the error bound of the randomized global tail at that rank when that is larger. Each crossover is
    located to the integer budget by bisection between neighbouring evaluated budgets whose verdicts differ
    (one switch per such pair: between grid points the verdict could switch back and forth).
    """
    budgets = check_budgets(budgets, layout)
    lora = LoraProblem(module_spectra(deltas, progress))
    spectrum = global_spectrum(deltas, layout, budgets[-1], rtol=rtol, seed=seed, progress=progress)
    total = spectrum.total

    def record(budget: int) -> BudgetRecord:
        e_gfa, gfa_rank = gfa_error(spectrum, budget)
        exact, greedy, equal = lora.exact(budget), lora.greedy(budget), lora.equal_rank(budget)
        band = max(tie_tolerance * total, spectrum.tail_error(gfa_rank))
        favoured = "tie" if abs(e_gfa - exact.error) <= band else ("gfa" if e_gfa < exact.error else "lora")
        return BudgetRecord(
            budget=budget,
            e_gfa=e_gfa,
            e_lora=exact.error,
            e_lora_greedy=greedy.error,
            e_lora_equal=equal.error,
            e_gfa_rel=_relative(e_gfa, total),
            e_lora_rel=_relative(exact.error, total),
            e_lora_greedy_rel=_relative(greedy.error, total),
            e_lora_equal_rel=_relative(equal.error, total),
            gfa_rank=gfa_rank,
            gfa_error_bound=spectrum.tail_error(gfa_rank),
            lora_ranks=exact.ranks,
            lora_cost=exact.cost,
            lora_equal_rank=max(equal.ranks.values()),
            tie_band=band,
            favoured=favoured,
        )

    records = [record(budget) for budget in tqdm(budgets, desc="budgets", disable=not progress)]
    return LensReport(
        total_energy=total,
        d=layout.d,
        m=layout.m,
        k=layout.k,
        gfa_spectrum_rank=spectrum.known_rank,
        gfa_spectrum_iterations=spectrum.iterations,
        gfa_spectrum_error_bound=spectrum.tail_error(spectrum.known_rank),
        tie_tolerance=tie_tolerance,
        records=records,
        crossovers=_crossovers(records, lambda budget: record(budget).favoured),
    )


def _relative(error: float, total: float) -> float:
    return error / total if total > 0 else 0.0


def _crossovers(records: Sequence[BudgetRecord], favoured_at: Callable[[int], Favoured]) -> list[Crossover]:
    decided = [record for record in records if record.favoured != "tie"]
    found = []
    for below, above in itertools.pairwise(decided):
        if below.favoured == above.favoured:
            continue
        low, high = below.budget, above.budget  # favoured at low: below.favoured; at high: something else
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if favoured_at(middle) == below.favoured else (low, middle)
        found.append(Crossover(budget=high, before=below.favoured, after=above.favoured))
    return found


@dataclass(frozen=True)
class GfaPoint:
    """E_GFA at one budget for one layout; the true error lies in [e_gfa - gfa_error_bound, e_gfa]."""

    budget: int
    e_gfa: float
    e_gfa_rel: float
    gfa_rank: int
    gfa_error_bound: float


def module_order_effect(
    deltas: Mapping[str, Tensor],
    layouts: Mapping[str, Layout],
    budgets: Iterable[int],
    *,
    rtol: float = DEFAULT_RTOL,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, list[GfaPoint]]:
    """E_GFA at every budget (ascending) for each named layout of the same modules, e.g. one per module order.
    E_LoRA does not depend on the order, so only GFA's side is computed."""
    effect = {}
    for label, layout in layouts.items():
        budgets = check_budgets(budgets, layout)
        spectrum = global_spectrum(deltas, layout, budgets[-1], rtol=rtol, seed=seed, progress=progress)
        effect[label] = []
        for budget in budgets:
            error, rank = gfa_error(spectrum, budget)
            relative = _relative(error, spectrum.total)
            effect[label].append(GfaPoint(budget, error, relative, rank, spectrum.tail_error(rank)))
    return effect
