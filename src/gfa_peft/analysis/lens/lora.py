"""E_LoRA(P): the best per-module LoRA ranks within a budget, solved exactly in integers.

With gains g_ij = sigma_ij^2 (non-increasing in j) and cost c_i = p_i + q_i per unit of rank, giving module i
rank r_i captures its r_i largest gains, and

    E_LoRA(P) = ||Delta*||^2 - max { sum_i sum_{j <= r_i} g_ij  :  sum_i r_i c_i <= P,  0 <= r_i <= min(p_i, q_i) }.

This is a knapsack. Greedy by gain per parameter solves its fractional relaxation but not the integer problem:
budget left over that is too small for the next unit may be better spent by giving up one unit for several
cheaper ones. `LoraProblem.exact` finds the integer optimum; see its docstring for why it is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gfa_peft.analysis.lens.spectrum import Spectrum


@dataclass(frozen=True)
class LoraAllocation:
    """Per-module LoRA ranks, what they cost (sum_i r_i c_i) and the squared error they leave."""

    ranks: dict[str, int]
    cost: int
    error: float


@dataclass(frozen=True)
class _CostClass:
    """The modules sharing one cost c = p + q, their gains merged: `gains` descending, `owners[u]` the index
    in `names` of the module gain u comes from, `captured[t]` the sum of the t largest gains."""

    cost: int
    names: list[str]
    gains: Tensor
    owners: Tensor
    captured: Tensor = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "captured", torch.cat([torch.zeros(1, dtype=torch.float64), self.gains.cumsum(0)]))

    @property
    def size(self) -> int:
        return len(self.gains)

    def module_ranks(self, total_rank: int) -> dict[str, int]:
        """Each module's rank when the class takes its `total_rank` largest gains."""
        counts = torch.bincount(self.owners[:total_rank], minlength=len(self.names))
        return dict(zip(self.names, counts.tolist()))


@dataclass(frozen=True)
class _Units:
    """Every rank unit of some cost classes, in order of gain per parameter: class index, cost and gain."""

    which: Tensor
    costs: Tensor
    gains: Tensor

    @classmethod
    def of(cls, classes: Sequence[_CostClass]) -> _Units:
        which = torch.cat([torch.full((group.size,), i) for i, group in enumerate(classes)])
        costs = torch.cat([torch.full((group.size,), group.cost) for group in classes])
        gains = torch.cat([group.gains for group in classes])
        order = torch.argsort(gains / costs, descending=True, stable=True)
        return cls(which[order], costs[order], gains[order])


class LoraProblem:
    """The LoRA allocation problem of Definition 3.1 for fixed module spectra; the sorting is done once, so
    each budget is cheap to solve."""

    def __init__(self, module_spectra: Mapping[str, Spectrum]):
        if not module_spectra:
            raise ValueError("no modules to allocate LoRA ranks to")
        incomplete = [name for name, spectrum in module_spectra.items() if not spectrum.complete]
        if incomplete:
            raise ValueError(f"LoRA's error needs complete module spectra; incomplete: {incomplete}")
        self.module_spectra = dict(module_spectra)
        # Most expensive first, so the cheapest class, which has the most rank choices, is the one `exact`
        # settles in closed form.
        self.classes = _cost_classes(self.module_spectra)
        self.units = _Units.of(self.classes)
        self.remaining_bounds = [_fractional_bound(self.classes[index + 1 :]) for index in range(len(self.classes) - 1)]

    def allocation(self, ranks: Mapping[str, int]) -> LoraAllocation:
        """The cost and the error sum_i tail_i(r_i) of a rank choice."""
        return LoraAllocation(
            ranks=dict(ranks),
            cost=sum(rank * self.module_spectra[name].rank_cost for name, rank in ranks.items()),
            error=sum(self.module_spectra[name].tail(rank) for name, rank in ranks.items()),
        )

    def equal_rank(self, budget: int) -> LoraAllocation:
        """What LoRA actually trains: one rank r = P // sum_i c_i for every module (capped at its full rank)."""
        rank = budget // sum(spectrum.rank_cost for spectrum in self.module_spectra.values())
        return self.allocation({name: min(rank, min(s.shape)) for name, s in self.module_spectra.items()})

    def greedy(self, budget: int) -> LoraAllocation:
        """Greedy by gain per parameter sigma_ij^2 / c_i, taking every rank unit that still fits."""
        return self.allocation(self._module_ranks(self._greedy_class_ranks(budget)))

    def exact(self, budget: int) -> LoraAllocation:
        """E_LoRA(P) of Proposition 3.2 with ranks attaining it: the exact integer optimum.

        1. Cost classes. Modules with the same c_i cost the same per unit of rank, so within such a class only
           the class's total rank t enters the budget. For a given t the best choice takes the t largest gains
           of the whole class: they form a prefix of every module's (sorted) list, hence a valid rank choice,
           and no t gains of the class sum to more. So a class contributes F_c(t) = the sum of its t largest
           gains, and it remains to choose one t_c per class: max sum_c F_c(t_c) s.t. sum_c c t_c <= P.
        2. Dynamic programming over the (few) classes. A partial choice of t_c for the classes so far is
           dropped only if (a) another spends no more budget and captures at least as much - whatever completes
           the first completes the second as well - or (b) even the fractional relaxation of the remaining
           classes (an upper bound on any integer completion) cannot lift it to the greedy integer solution,
           which is feasible. Neither drops every optimal choice. The last class needs no enumeration: F_c is
           non-decreasing, so it takes the largest t the budget left allows.
        """
        greedy = self._greedy_class_ranks(budget)
        floor = sum(float(group.captured[t]) for group, t in zip(self.classes, greedy))
        slack = 1e-9 * sum(float(group.captured[-1]) for group in self.classes)  # rounding in the bound's sums
        spent = torch.zeros(1, dtype=torch.long)
        captured = torch.zeros(1, dtype=torch.float64)
        choices = torch.zeros(1, 0, dtype=torch.long)
        for group, remaining_bound in zip(self.classes, self.remaining_bounds):
            ranks = torch.arange(min(group.size, budget // group.cost) + 1)
            choices = torch.cat([choices.repeat_interleave(len(ranks), 0), ranks.repeat(len(choices))[:, None]], 1)
            spent = (spent[:, None] + group.cost * ranks).flatten()
            captured = (captured[:, None] + group.captured[ranks]).flatten()
            keep = spent <= budget
            keep &= captured + remaining_bound((budget - spent).clamp_min(0)) >= floor - slack
            spent, captured, choices = _undominated(spent[keep], captured[keep], choices[keep])
        last = self.classes[-1]
        last_ranks = ((budget - spent) // last.cost).clamp(max=last.size)
        best = int(torch.argmax(captured + last.captured[last_ranks]))
        return self.allocation(self._module_ranks([*choices[best].tolist(), int(last_ranks[best])]))

    def _module_ranks(self, class_ranks: Sequence[int]) -> dict[str, int]:
        ranks = {}
        for group, total_rank in zip(self.classes, class_ranks):
            ranks.update(group.module_ranks(total_rank))
        return {name: ranks[name] for name in self.module_spectra}

    def _greedy_class_ranks(self, budget: int) -> list[int]:
        """Each class's total rank under greedy by gain per parameter, skipping units that no longer fit.

        Once a unit of some class does not fit, no later unit of that class will (the budget left only
        shrinks), so each pass takes the longest affordable run of units, then drops the class that stopped it.
        """
        which, costs = self.units.which, self.units.costs
        taken = [0] * len(self.classes)
        left = budget
        while len(costs):
            spent = costs.cumsum(0)
            fits = int(torch.searchsorted(spent, torch.tensor(left), right=True))
            for index, count in enumerate(torch.bincount(which[:fits], minlength=len(self.classes)).tolist()):
                taken[index] += count
            left -= int(spent[fits - 1]) if fits else 0
            if fits == len(costs):
                break
            others = which[fits:] != which[fits]
            which, costs = which[fits:][others], costs[fits:][others]
        return taken


def lora_error_exact(module_spectra: Mapping[str, Spectrum], budget: int) -> LoraAllocation:
    """E_LoRA(P): the exact optimum over integer per-module ranks (`LoraProblem.exact`)."""
    return LoraProblem(module_spectra).exact(budget)


def lora_error_greedy(module_spectra: Mapping[str, Spectrum], budget: int) -> LoraAllocation:
    """Greedy by gain per parameter (`LoraProblem.greedy`): feasible, not always optimal."""
    return LoraProblem(module_spectra).greedy(budget)


def lora_error_equal_rank(module_spectra: Mapping[str, Spectrum], budget: int) -> LoraAllocation:
    """One rank for every module, r = P // sum_i c_i (`LoraProblem.equal_rank`)."""
    return LoraProblem(module_spectra).equal_rank(budget)


def _cost_classes(module_spectra: Mapping[str, Spectrum]) -> list[_CostClass]:
    """The cost classes, most expensive first."""
    by_cost: dict[int, list[str]] = {}
    for name, spectrum in module_spectra.items():
        by_cost.setdefault(spectrum.rank_cost, []).append(name)
    classes = []
    for cost in sorted(by_cost, reverse=True):
        names = by_cost[cost]
        gains = torch.cat([module_spectra[name].squares for name in names])
        owners = torch.cat([torch.full((len(module_spectra[name].squares),), i) for i, name in enumerate(names)])
        # A stable sort keeps each module's equal gains in their own order, so every prefix is a rank choice.
        order = torch.argsort(gains, descending=True, stable=True)
        classes.append(_CostClass(cost, names, gains[order], owners[order]))
    return classes


def _fractional_bound(classes: Sequence[_CostClass]) -> Callable[[Tensor], Tensor]:
    """budget -> the most the classes can capture with real-valued ranks: units by gain per parameter, the
    first one that does not fit taken in part. An upper bound on every integer rank choice."""
    units = _Units.of(classes)
    spent = torch.cat([torch.zeros(1, dtype=torch.long), units.costs.cumsum(0)])
    captured = torch.cat([torch.zeros(1, dtype=torch.float64), units.gains.cumsum(0)])
    ratio = torch.cat([units.gains / units.costs, torch.zeros(1, dtype=torch.float64)])

    def bound(budget: Tensor) -> Tensor:
        whole = torch.searchsorted(spent, budget, right=True) - 1  # units that fit entirely
        return captured[whole] + (budget - spent[whole]) * ratio[whole]

    return bound


def _undominated(spent: Tensor, captured: Tensor, choices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The partial choices no other one beats (spending no more and capturing at least as much)."""
    by_capture = torch.argsort(captured, descending=True, stable=True)
    order = by_capture[torch.argsort(spent[by_capture], stable=True)]  # by spend, then by capture, best first
    spent, captured, choices = spent[order], captured[order], choices[order]
    best_before = torch.cummax(captured, 0).values
    keep = torch.cat([torch.ones(1, dtype=torch.bool), captured[1:] > best_before[:-1]])
    return spent[keep], captured[keep], choices[keep]
