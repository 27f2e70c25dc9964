"""The whole lens study of `gfa lens`: budgets, the report at each, module orders, and its table and figure."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from gfa_peft.analysis.budget import ordered_layout, rank_anchors
from gfa_peft.analysis.lens.report import check_budgets, feasible_floor, lens_report, module_order_effect
from gfa_peft.io.tables import text_table
from gfa_peft.defaults import DEFAULT_GRID_POINTS
from gfa_peft.layout import ModuleOrder


def lens_study(deltas: Mapping[str, torch.Tensor], orders: Sequence[ModuleOrder], anchor_labels: Sequence[str],
               budgets: Sequence[int] | None = None, grid_points: int = DEFAULT_GRID_POINTS, *,
               tie_tolerance: float, rtol: float, seed: int, progress: bool = True) -> dict:
    """E_GFA and E_LoRA of the proxy update `deltas` at every budget (default: the anchors plus `grid_points`
    log-spaced budgets), GFA laid out in `orders[0]`, with E_GFA in every other order beside it.

    Raises ValueError for a zero update, a malformed anchor or an infeasible budget.
    """
    named_shapes = [(name, tuple(delta.shape)) for name, delta in deltas.items()]
    layouts = {str(order): ordered_layout(named_shapes, order) for order in orders}
    anchors = rank_anchors(named_shapes, anchor_labels, orders[0])
    if all(not torch.any(delta) for delta in deltas.values()):
        raise ValueError("the proxy update is zero on every target module: there is nothing to approximate")
    main_label, main_layout = next(iter(layouts.items()))
    floor, why = feasible_floor(main_layout)
    if budgets is None:
        budgets = default_budgets(floor, [anchor.budget for anchor in anchors], grid_points)
    budgets = check_budgets(budgets, main_layout)
    report = lens_report(deltas, main_layout, budgets, tie_tolerance=tie_tolerance, rtol=rtol, seed=seed,
                         progress=progress).to_dict()
    others = {label: layout for label, layout in layouts.items() if label != main_label}
    effect = module_order_effect(deltas, others, budgets, rtol=rtol, seed=seed, progress=progress)
    gfa_keys = ("budget", "e_gfa", "e_gfa_rel", "gfa_rank", "gfa_error_bound")
    return {
        "modules": [{"name": name, "shape": list(shape)} for name, shape in named_shapes],
        "module_order": main_label,
        "smallest_feasible_budget": floor,
        "smallest_feasible_budget_why": why,
        "anchors": [{"label": anchor.label, "budget": anchor.budget} for anchor in anchors],
        **report,
        "module_orders": {
            main_label: [{key: record[key] for key in gfa_keys} for record in report["budgets"]],
            **{label: [asdict(point) for point in points] for label, points in effect.items()},
        },
    }


def default_budgets(floor: int, anchor_budgets: Sequence[int], points: int) -> list[int]:
    """The anchors at or above the smallest feasible budget, plus `points` log-spaced integers from that budget
    up to the largest anchor."""
    top = max([floor, *anchor_budgets])
    grid = {round(math.exp(math.log(floor) + i * (math.log(top) - math.log(floor)) / max(points - 1, 1)))
            for i in range(points)}
    return sorted(grid | {budget for budget in anchor_budgets if budget >= floor})


def format_report(data: Mapping) -> str:
    """The report as a readable table: errors in % of ||Delta*||^2."""
    anchors = {anchor["budget"]: anchor["label"] for anchor in data["anchors"]}
    total = data["total_energy"]
    if data["gfa_spectrum_iterations"]:
        bound = 100 * data["gfa_spectrum_error_bound"] / total
        how = f"{data['gfa_spectrum_iterations']} power iterations, head-energy error <= {bound:.2g}% of ||Delta*||^2"
    else:
        how = "a dense decomposition (exact)"
    lines = [
        (f"Delta*: {len(data['modules'])} modules, d = {data['d']:,}, "
         f"global matrix {data['m']:,} x {data['k']:,}, ||Delta*||^2 = {total:.6g}"),
        f"global spectrum: top {data['gfa_spectrum_rank']} singular values by {how}",
        f"smallest feasible budget {data['smallest_feasible_budget']:,} ({data['smallest_feasible_budget_why']})",
        "",
    ]
    header = ["budget", "anchor", "GFA r", "E_GFA %", "E_LoRA %", "greedy %", "equal r", "equal %", "favoured"]
    rows = [
        [f"{record['budget']:,}", anchors.get(record["budget"], ""), str(record["gfa_rank"]),
         _percent(record["e_gfa_rel"]), _percent(record["e_lora_rel"]), _percent(record["e_lora_greedy_rel"]),
         str(record["lora_equal_rank"]), _percent(record["e_lora_equal_rel"]), record["favoured"]]
        for record in data["budgets"]
    ]
    lines.append(text_table(header, rows))
    crossovers = data["crossovers"]
    lines += ["", "crossovers: " + ("; ".join(
        f"{crossover['from']} -> {crossover['to']} at P = {crossover['budget']:,}" for crossover in crossovers
    ) or "none (one class is favoured, or tied, throughout)")]
    orders = data["module_orders"]
    if len(orders) > 1:
        lines += ["", "E_GFA % by module order (E_LoRA does not depend on it):"]
        labels = list(orders)
        rows = [[f"{points[0]['budget']:,}", *(_percent(point["e_gfa_rel"]) for point in points)]
                for points in zip(*orders.values())]
        lines.append(text_table(["budget", *labels], rows))
    return "\n".join(lines)


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.4g}"


def plot_lens(data: Mapping, path: Path) -> None:
    """E / ||Delta*||^2 against the budget on a log-x axis: GFA (every module order), LoRA's optimal and
    equal-rank allocations, with the rank anchors as labelled vertical lines. Written atomically."""
    from gfa_peft.io.plots import plt, save_figure  # matplotlib loads (with Agg) only when a plot is drawn
    from matplotlib.ticker import NullLocator

    records = data["budgets"]
    budgets = [record["budget"] for record in records]
    figure, axes = plt.subplots(figsize=(8, 5))
    for index, (label, points) in enumerate(data["module_orders"].items()):
        axes.step([p["budget"] for p in points], [p["e_gfa_rel"] for p in points], where="post",
                  color=f"C{2 * index}", linewidth=1.5 if index == 0 else 0.9, label=f"GFA (module order {label})")
    axes.step(budgets, [r["e_lora_rel"] for r in records], where="post", color="C1", label="LoRA, optimal ranks")
    axes.step(budgets, [r["e_lora_equal_rel"] for r in records], where="post", color="C1", linestyle="--",
              label="LoRA, equal rank")
    shown = [anchor for anchor in data["anchors"] if budgets[0] <= anchor["budget"] <= budgets[-1]]
    for anchor in shown:
        axes.axvline(anchor["budget"], color="grey", linewidth=0.8, alpha=0.5)
    axes.set_xscale("log")
    anchor_axis = axes.secondary_xaxis("top")
    anchor_axis.set_xticks([anchor["budget"] for anchor in shown], [anchor["label"] for anchor in shown])
    anchor_axis.xaxis.set_minor_locator(NullLocator())
    anchor_axis.set_xlabel("rank anchors: LoRA's count at rank 1, 2, 4, ...; 1/2 = about 0.3 x LoRA r=1")
    axes.set_xlabel("budget P (trainable parameters)")
    axes.set_ylabel("E(P) / ||Delta*||^2")
    axes.set_ylim(bottom=-0.02)  # an error of exactly 0 (a budget that fits the whole update) stays off the frame
    axes.set_title(f"approximation lens: {len(data['modules'])} modules, m x k = {data['m']:,} x {data['k']:,}")
    axes.legend(loc="best", fontsize=8)
    save_figure(figure, path)
