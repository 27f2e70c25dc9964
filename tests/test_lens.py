"""The approximation lens: the paper's two sanity cases, the exact LoRA allocation against brute force, the
randomized global spectrum against a dense one, and the global matrix against a hand concatenation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gfa_peft.analysis.budget import ordered_layout
from gfa_peft.layout import order_modules
from gfa_peft.analysis.lens import (
    Crossover,
    LoraProblem,
    check_budgets,
    dense_spectrum,
    global_matrix,
    lens_report,
    lora_error_equal_rank,
    lora_error_exact,
    lora_error_greedy,
    top_singular_values,
)

ZERO = 1e-12  # "exactly zero" for a relative squared error computed in float64


def layout_of(deltas):
    return ordered_layout([(name, tuple(delta.shape)) for name, delta in deltas.items()])


def random_orthonormal(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, columns, generator=generator, dtype=torch.float64)).Q


# ----------------------------------------------------------------------------------- the paper's sanity cases


def test_locally_rank1_but_globally_incoherent_update_favours_lora():
    """Rank 1 in every module, unrelated across modules: LoRA r=1 is exact, GFA at that budget is not."""
    generator = torch.Generator().manual_seed(0)
    deltas = {
        f"layers.{i}.q_proj": torch.outer(torch.randn(24, generator=generator, dtype=torch.float64),
                                          torch.randn(16, generator=generator, dtype=torch.float64))
        for i in range(9)
    }
    lora_rank1_budget = sum(24 + 16 for _ in deltas)
    layout = layout_of(deltas)
    record = lens_report(deltas, layout, [lora_rank1_budget]).records[0]
    assert record.lora_ranks == {name: 1 for name in deltas}
    assert record.e_lora_rel < ZERO and record.e_lora_equal_rel < ZERO
    # GFA affords floor(360 / (m + k)) = 3 global ranks; each module's rank-1 rows point in its own direction.
    assert record.gfa_rank == lora_rank1_budget // (layout.m + layout.k) == 3
    assert record.e_gfa_rel > 0.3
    assert record.favoured == "lora"


def test_globally_rank1_update_favours_gfa():
    """Slices of one global rank-1 M: GFA rank 1 (budget m + k) is exact, while every module slice is high-rank."""
    generator = torch.Generator().manual_seed(1)
    shapes = [(f"layers.{i}.v_proj", (6, 25)) for i in range(6)]  # d = 900 = 30 x 30, no padding
    layout = ordered_layout(shapes)
    assert (layout.m, layout.k, layout.padding) == (30, 30, 0)
    global_rank1 = torch.outer(torch.randn(30, generator=generator, dtype=torch.float64),
                               torch.randn(30, generator=generator, dtype=torch.float64)).flatten()
    deltas = {piece.name: global_rank1[piece.offset : piece.end].view(piece.shape) for piece in layout.modules}
    assert all(torch.linalg.matrix_rank(delta) > 1 for delta in deltas.values())
    record = lens_report(deltas, layout, [layout.m + layout.k]).records[0]
    assert record.gfa_rank == 1 and record.e_gfa_rel < ZERO
    assert record.e_lora_rel > 0.3
    assert record.favoured == "gfa"


# ----------------------------------------------------------------------------------- E_LoRA: exact integer optimum


def brute_force_lora(module_spectra, budget):
    """Every per-module rank tuple within the budget; the smallest total tail."""
    names = list(module_spectra)
    best = math.inf
    for ranks in itertools.product(*(range(min(module_spectra[n].shape) + 1) for n in names)):
        if sum(r * module_spectra[n].rank_cost for n, r in zip(names, ranks)) <= budget:
            best = min(best, sum(module_spectra[n].tail(r) for n, r in zip(names, ranks)))
    return best


matrix_shapes = st.tuples(st.integers(1, 4), st.integers(1, 4))


@settings(max_examples=150, deadline=None)
@given(shapes=st.lists(matrix_shapes, min_size=1, max_size=4), budget=st.integers(1, 40), seed=st.integers(0, 10**6))
def test_exact_lora_allocation_matches_brute_force(shapes, budget, seed):
    generator = torch.Generator().manual_seed(seed)
    spectra = {
        f"m{i}": dense_spectrum(torch.randn(shape, generator=generator, dtype=torch.float64))
        for i, shape in enumerate(shapes)
    }
    exact = lora_error_exact(spectra, budget)
    assert exact.cost <= budget
    assert exact.cost == sum(exact.ranks[n] * spectra[n].rank_cost for n in spectra)
    assert exact.error == pytest.approx(sum(spectra[n].tail(exact.ranks[n]) for n in spectra))
    assert exact.error == pytest.approx(brute_force_lora(spectra, budget), abs=1e-9)
    for other in (lora_error_greedy(spectra, budget), lora_error_equal_rank(spectra, budget)):
        assert other.cost <= budget
        assert other.error >= exact.error - 1e-9


def test_greedy_by_ratio_is_suboptimal_where_the_exact_solver_is_not():
    """Costs 3 (a 1x2 module, gain 3.3) and 2 (two 1x1 modules, gain 2 each), budget 4. Greedy takes the best
    gain per parameter, 3.3/3 = 1.1 > 1, and has 1 left: error 2 + 2 = 4. Both cheap modules fit: error 3.3."""
    spectra = {
        "a": dense_spectrum(torch.tensor([[math.sqrt(3.3), 0.0]], dtype=torch.float64)),
        "b1": dense_spectrum(torch.tensor([[math.sqrt(2.0)]], dtype=torch.float64)),
        "b2": dense_spectrum(torch.tensor([[math.sqrt(2.0)]], dtype=torch.float64)),
    }
    problem = LoraProblem(spectra)
    greedy, exact = problem.greedy(4), problem.exact(4)
    assert greedy.ranks == {"a": 1, "b1": 0, "b2": 0} and greedy.error == pytest.approx(4.0)
    assert exact.ranks == {"a": 0, "b1": 1, "b2": 1} and exact.error == pytest.approx(3.3)


def test_equal_rank_is_budget_over_lora_rank1_count_capped_per_module():
    generator = torch.Generator().manual_seed(2)
    spectra = {"wide": dense_spectrum(torch.randn(2, 9, generator=generator, dtype=torch.float64)),
               "tall": dense_spectrum(torch.randn(7, 5, generator=generator, dtype=torch.float64))}
    per_rank = 11 + 12
    equal = lora_error_equal_rank(spectra, 3 * per_rank + 5)
    assert equal.ranks == {"wide": 2, "tall": 3}  # rank 3, capped at the 2 x 9 module's full rank
    assert equal.error == pytest.approx(spectra["tall"].tail(3))


# ----------------------------------------------------------------------------------- the global spectrum


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_randomized_spectrum_matches_dense_within_its_bound(dtype):
    """600 x 500 with sigma_j = 0.95^j: the captured head never exceeds the true one, and falls short by at most
    the reported bound, which meets rtol."""
    generator = torch.Generator().manual_seed(3)
    sigma = 0.95 ** torch.arange(500, dtype=torch.float64)
    matrix = (random_orthonormal(600, 500, generator) * sigma) @ random_orthonormal(500, 500, generator).T
    matrix = matrix.to(dtype)
    truth = torch.linalg.svdvals(matrix.double()) ** 2
    n, rtol = 40, 1e-5
    spectrum = top_singular_values(matrix, n, rtol=rtol)
    assert spectrum.iterations > 0 and not spectrum.complete  # the randomized path, not the dense fallback
    assert spectrum.total == pytest.approx(float(truth.sum()), rel=1e-12)
    assert spectrum.tail_error(n) <= rtol * spectrum.total
    rounding = max(1e-9, torch.finfo(dtype).eps) * spectrum.total  # float32 sums round at about 1e-7
    for r in range(n + 1):
        true_tail = float(truth[r:].sum())
        overstatement = spectrum.tail(r) - true_tail
        assert -rounding <= overstatement <= spectrum.tail_error(r) + rounding
    captured = spectrum.squares.cumsum(0)
    assert torch.allclose(captured, truth[:n].cumsum(0), rtol=1e-5)


def test_small_request_on_a_small_matrix_uses_the_exact_dense_spectrum():
    matrix = torch.randn(30, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    spectrum = top_singular_values(matrix, 12)
    assert spectrum.complete and spectrum.iterations == 0
    assert torch.allclose(spectrum.squares.sqrt(), torch.linalg.svdvals(matrix))


def test_dense_spectrum_sees_a_kernel_as_out_by_the_rest():
    kernel = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    spectrum = dense_spectrum(kernel)
    assert spectrum.shape == (4, 12) and spectrum.rank_cost == 16
    assert torch.allclose(spectrum.squares, torch.linalg.svdvals(kernel.reshape(4, 12)) ** 2)
    assert spectrum.tail(4) == 0.0
    with pytest.raises(ValueError, match="outside the computed spectrum"):
        spectrum.tail(5)


# ----------------------------------------------------------------------------------- the global matrix


@pytest.mark.parametrize("module_order", ["model", "by_name", 7])
def test_global_matrix_is_the_hand_concatenation_in_the_methods_order(module_order):
    generator = torch.Generator().manual_seed(6)
    shapes = {"0.q": (3, 5), "0.v": (2, 5), "0.conv": (2, 1, 3, 3), "1.q": (3, 5), "1.v": (2, 5)}
    deltas = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    layout = ordered_layout(list(shapes.items()), module_order)
    flat = torch.cat([deltas[name].flatten() for name in order_modules(list(shapes), module_order)])
    assert flat.numel() == 68 and (layout.m, layout.k) == (9, 8)
    expected = torch.cat([flat, torch.zeros(9 * 8 - 68)]).view(9, 8)
    assert torch.equal(global_matrix(deltas, layout), expected)


def test_global_matrix_refuses_updates_that_do_not_fit_the_layout():
    deltas = {"a": torch.zeros(3, 4), "b": torch.zeros(2, 2)}
    layout = layout_of(deltas)
    with pytest.raises(ValueError, match=r"update of 'b' has shape \[2, 3\], the layout expects \[2, 2\]"):
        global_matrix({"a": torch.zeros(3, 4), "b": torch.zeros(2, 3)}, layout)
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        global_matrix({"a": torch.zeros(3, 4)}, layout)


# ----------------------------------------------------------------------------------- budgets and verdicts


def test_budgets_below_the_smallest_feasible_one_are_refused_naming_it():
    layout = ordered_layout([("big", (20, 30)), ("small", (4, 5))])  # d = 620: m + k = 25 + 24 = 49; small: 9
    assert check_budgets([60, 9, 9], layout) == [9, 60]
    with pytest.raises(ValueError, match=r"budget 8 is below the smallest feasible budget 9 .*'small'"):
        check_budgets([8, 100], layout)


def test_crossover_is_located_at_the_exact_budget():
    """A strong global rank-1 part over local rank-1 parts: below m + k = 60 GFA has rank 0 and LoRA (some
    module at rank 1, from 31 on) is favoured; from 60 on GFA captures the global part and is favoured."""
    generator = torch.Generator().manual_seed(7)
    shapes = [(f"layers.{i}.proj", (6, 25)) for i in range(6)]
    layout = ordered_layout(shapes)
    assert layout.m + layout.k == 60
    global_part = 3 * torch.outer(torch.randn(30, generator=generator), torch.randn(30, generator=generator)).flatten()
    deltas = {
        piece.name: global_part[piece.offset : piece.end].view(piece.shape)
        + torch.outer(torch.randn(6, generator=generator), torch.randn(25, generator=generator))
        for piece in layout.modules
    }
    report = lens_report(deltas, layout, [31, 45, 100, 200, 400, 800], tie_tolerance=0.0)
    assert [record.favoured for record in report.records] == ["lora", "lora", "gfa", "gfa", "gfa", "gfa"]
    assert report.crossovers == [Crossover(budget=60, before="lora", after="gfa")]
