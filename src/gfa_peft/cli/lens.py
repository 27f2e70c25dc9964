"""`gfa lens`: the approximation lens of Section 3 on a proxy target update, budget by budget."""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from gfa_peft.budget import DEFAULT_ANCHORS, ordered_layout, rank_anchors
from gfa_peft.cli import UsageError
from gfa_peft.cli.arguments import emit_json, output_path, parse_list, parse_targets
from gfa_peft.experiments.lens_inputs import deltas_from_adapter, deltas_from_file, deltas_from_models, save_deltas
from gfa_peft.experiments.text_table import text_table
from gfa_peft.layout import parse_module_order
from gfa_peft.lens import (
    DEFAULT_RTOL,
    DEFAULT_TIE_TOLERANCE,
    check_budgets,
    feasible_floor,
    lens_report,
    module_order_effect,
)
from gfa_peft.targets import ALL_LINEAR

DEFAULT_GRID_POINTS = 40


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "lens",
        help="which class, GFA or LoRA, approximates a proxy update better at each budget (Prop. 3.2)",
        description=(
            "The approximation lens of Section 3. From a proxy target update Delta* (a full fine-tune minus its "
            "base, a trained adapter of any kind merged into its base, or saved tensors) compute, at each budget P "
            "of trainable parameters, E_GFA(P) = the best rank-r error of the global m x k matrix with "
            "r (m + k) <= P, and E_LoRA(P) = the best error of per-module ranks r_i with sum_i r_i (p_i + q_i) <= P "
            "(the exact integer optimum, with greedy and equal-rank allocations beside it). Errors are squared "
            "Frobenius norms relative to ||Delta*||^2. The top of the global spectrum is computed by randomized "
            "subspace iteration to the error bound --rtol."
        ),
    )
    source = parser.add_argument_group("proxy update (give --base with --tuned or --adapter, or give --deltas)")
    source.add_argument("--base", metavar="DIR", help="the base model folder")
    source.add_argument("--tuned", metavar="DIR", help="a fully fine-tuned model folder: Delta* = tuned - base")
    source.add_argument("--adapter", metavar="DIR",
                        help="a PEFT adapter folder of any method trained on --base: Delta* = merged - base")
    source.add_argument("--deltas", metavar="FILE",
                        help="a safetensors file of module name -> update in (out, in, ...) orientation "
                        "(as --save-deltas writes)")
    parser.add_argument(
        "--targets", metavar="NAMES",
        help=f"comma-separated module names (PEFT target_modules semantics) or '{ALL_LINEAR}'; default: "
        "PEFT's LoRA default for the model type (--tuned), the adapter's targets (--adapter), every tensor (--deltas)",
    )
    parser.add_argument(
        "--budgets", metavar="P1,P2,...",
        help="budgets in trainable parameters; default: the rank anchors plus a log-spaced grid from the smallest "
        "feasible budget, min(m + k, min_i (p_i + q_i)), to the largest anchor",
    )
    parser.add_argument("--anchors", default=",".join(DEFAULT_ANCHORS), metavar="LABELS",
                        help="rank anchors to mark (and by default evaluate): '1/2' or LoRA ranks "
                        "(default: %(default)s)")
    parser.add_argument("--grid-points", type=int, default=DEFAULT_GRID_POINTS, metavar="N",
                        help="points of the default log-spaced grid (default: %(default)s; 0: anchors only)")
    parser.add_argument(
        "--module-order", default="model", metavar="ORDERS",
        help="comma-separated concatenation orders: 'model', 'by_name', integer seeds; the first is compared with "
        "LoRA, and E_GFA is reported for every one (default: %(default)s)",
    )
    parser.add_argument("--tie-tolerance", type=float, default=DEFAULT_TIE_TOLERANCE, metavar="FRACTION",
                        help="errors closer than this fraction of ||Delta*||^2 (or than the spectrum's error bound) "
                        "are a tie (default: %(default)s)")
    parser.add_argument("--rtol", type=float, default=DEFAULT_RTOL, metavar="FRACTION",
                        help="stop the randomized global SVD once its head-energy error bound is below this "
                        "fraction of ||Delta*||^2 (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD (default: %(default)s)")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="write the report as JSON to FILE, or to stdout when FILE is omitted (then no table)")
    parser.add_argument("--plot", metavar="FILE",
                        help="plot E / ||Delta*||^2 against the budget (log x) to FILE (.png)")
    parser.add_argument("--save-deltas", metavar="FILE",
                        help="also save Delta* as safetensors, to rerun the lens with --deltas FILE")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    json_path, plot_path, deltas_path = (output_path(path) for path in (args.json, args.plot, args.save_deltas))
    if args.deltas and args.save_deltas and Path(args.deltas).resolve() == deltas_path.resolve():
        raise UsageError("--save-deltas would overwrite the --deltas input")
    orders = [parse_module_order(order) for order in parse_list(args.module_order, "--module-order")]
    if len({str(order) for order in orders}) < len(orders):
        raise UsageError(f"--module-order {args.module_order!r} names an order twice")
    budgets = _parse_budgets(args.budgets) if args.budgets else None
    anchor_labels = parse_list(args.anchors, "--anchors")
    if args.grid_points < 0:
        raise UsageError(f"--grid-points must be >= 0, got {args.grid_points}")
    if args.tie_tolerance < 0 or not 0 < args.rtol < 1:
        raise UsageError("--tie-tolerance must be >= 0 and --rtol in (0, 1)")
    targets = parse_targets(args.targets) if args.targets else None

    try:
        deltas = _load_deltas(args, targets)
        named_shapes = [(name, tuple(delta.shape)) for name, delta in deltas.items()]
        layouts = {str(order): ordered_layout(named_shapes, order) for order in orders}
        anchors = rank_anchors(named_shapes, anchor_labels, orders[0])
    except (ValueError, TypeError, OSError) as error:
        raise UsageError(str(error)) from None
    if all(not torch.any(delta) for delta in deltas.values()):
        raise UsageError("the proxy update is zero on every target module: there is nothing to approximate")
    main_label, main_layout = next(iter(layouts.items()))
    floor, why = feasible_floor(main_layout)
    anchor_points = [{"label": anchor.label, "budget": anchor.budget} for anchor in anchors]
    if budgets is None:
        budgets = default_budgets(floor, [anchor.budget for anchor in anchors], args.grid_points)
    try:
        budgets = check_budgets(budgets, main_layout)
    except ValueError as error:
        raise UsageError(str(error)) from None

    report = lens_report(
        deltas, main_layout, budgets, tie_tolerance=args.tie_tolerance, rtol=args.rtol, seed=args.seed,
        progress=args.json != "-",
    ).to_dict()
    others = {label: layout for label, layout in layouts.items() if label != main_label}
    effect = module_order_effect(deltas, others, budgets, rtol=args.rtol, seed=args.seed, progress=args.json != "-")
    gfa_keys = ("budget", "e_gfa", "e_gfa_rel", "gfa_rank", "gfa_error_bound")
    data = {
        "source": _describe_source(args),
        "targets": targets,
        "modules": [{"name": name, "shape": list(shape)} for name, shape in named_shapes],
        "module_order": main_label,
        "smallest_feasible_budget": floor,
        "smallest_feasible_budget_why": why,
        "anchors": anchor_points,
        **report,
        "module_orders": {
            main_label: [{key: record[key] for key in gfa_keys} for record in report["budgets"]],
            **{label: [asdict(point) for point in points] for label, points in effect.items()},
        },
    }

    if deltas_path is not None:
        save_deltas(deltas_path, deltas)
    show_text = emit_json(data, args.json, json_path)
    if plot_path is not None:
        plot_lens(data, plot_path)
    if show_text:
        print(format_report(data))
    return 0


def default_budgets(floor: int, anchor_budgets: Sequence[int], points: int) -> list[int]:
    """The anchors at or above the smallest feasible budget, plus `points` log-spaced integers from that budget
    up to the largest anchor."""
    top = max([floor, *anchor_budgets])
    grid = {round(math.exp(math.log(floor) + i * (math.log(top) - math.log(floor)) / max(points - 1, 1)))
            for i in range(points)}
    return sorted(grid | {budget for budget in anchor_budgets if budget >= floor})


def _load_deltas(args: argparse.Namespace, targets) -> dict[str, torch.Tensor]:
    given = {flag for flag in ("base", "tuned", "adapter", "deltas") if getattr(args, flag)}
    if given == {"base", "tuned"}:
        return deltas_from_models(args.base, args.tuned, targets)
    if given == {"base", "adapter"}:
        return deltas_from_adapter(args.adapter, args.base, targets)
    if given == {"deltas"}:
        return deltas_from_file(args.deltas, targets)
    raise UsageError(
        f"give --base with --tuned, --base with --adapter, or --deltas alone; got {_flags(given) or 'none of them'}"
    )


def _flags(names: set[str]) -> str:
    return ", ".join(f"--{name}" for name in sorted(names))


def _describe_source(args: argparse.Namespace) -> dict:
    return {flag: getattr(args, flag) for flag in ("base", "tuned", "adapter", "deltas") if getattr(args, flag)}


def _parse_budgets(text: str) -> list[int]:
    budgets = []
    for item in parse_list(text, "--budgets"):
        try:
            budget = int(item.replace("_", ""))
        except ValueError:
            raise UsageError(f"--budgets entry {item!r} is not an integer") from None
        if budget < 1:
            raise UsageError(f"--budgets entry {item!r} is not positive")
        budgets.append(budget)
    return budgets


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
    from gfa_peft.experiments.plots import plt, save_figure  # matplotlib loads (with Agg) only when a plot is drawn
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
    anchor_axis.set_xticks([anchor["budget"] for anchor in shown], [f"r={anchor['label']}" for anchor in shown])
    anchor_axis.xaxis.set_minor_locator(NullLocator())
    anchor_axis.set_xlabel("rank anchors (LoRA's count at rank r)")
    axes.set_xlabel("budget P (trainable parameters)")
    axes.set_ylabel("E(P) / ||Delta*||^2")
    axes.set_ylim(bottom=0)
    axes.set_title(f"approximation lens: {len(data['modules'])} modules, m x k = {data['m']:,} x {data['k']:,}")
    axes.legend(loc="best", fontsize=8)
    save_figure(figure, path)
