"""`gfa inspect`: the realized rank and size of every module's update in a saved GFA adapter."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from gfa_peft.cli import COMMANDS, UsageError
from gfa_peft.cli.arguments import add_json_argument, emit_json, json_report_path, plot_output_path
from gfa_peft.defaults import DEFAULT_RANK_TOL
from gfa_peft.io.tables import text_table


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help=COMMANDS["inspect"],
        description=(
            "Read a saved GFA adapter (no base model needed) and form each module's update "
            "Delta W_i = scale * its slice of B A, one module at a time, in float64. For each: its Frobenius norm "
            "and share of the update's energy, its numerical rank (singular values above --tol x the largest), "
            "its stable rank ||Delta W_i||_F^2 / ||Delta W_i||_2^2 and its largest possible rank min(p, q), "
            "against the global rank r: a module whose rows do not line up with the m x k grid can realize a rank "
            "far above r. Conv2d updates (out, in, kh, kw) are taken as (out, in * kh * kw) matrices. Also the "
            "layout and GFA's trainable count against LoRA's: at the same rank, at the same budget, and what LoRA "
            "would need to realize every module's rank."
        ),
    )
    parser.add_argument("adapter", metavar="ADAPTER", help="a saved GFA adapter folder (adapter_config.json + weights)")
    parser.add_argument("--tol", type=float, default=DEFAULT_RANK_TOL, metavar="FRACTION",
                        help="numerical rank: count singular values above FRACTION x the module's largest "
                        "(default: %(default)s, about 8 float32 ulps)")
    parser.add_argument("--top", type=int, metavar="N",
                        help="list only the N modules with the largest update norm, largest first "
                        "(default: every module, in layout order)")
    add_json_argument(parser, "the report", replaces="the table")
    parser.add_argument("--plot", metavar="FILE",
                        help="plot each module's numerical and stable rank in layout order, with r, to FILE (.png)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    json_path, plot_path = json_report_path(args.json), plot_output_path(args.plot)
    if not 0 < args.tol < 1:
        raise UsageError(f"--tol must be in (0, 1), got {args.tol}")
    if args.top is not None and args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    from gfa_peft.adapters.saved import load_saved_adapter  # torch and PEFT load once the arguments are checked
    from gfa_peft.analysis.ranks import realized_ranks

    try:
        adapter = load_saved_adapter(args.adapter)
        ranks = realized_ranks(adapter.B, adapter.A, adapter.layout, adapter.config.effective_scale, args.tol,
                               progress=not args.no_progress and args.json != "-", gains=adapter.gain)
    except (ValueError, TypeError, OSError) as error:  # not a folder, not GFA, missing or truncated weights
        raise UsageError(str(error)) from None
    report = {"adapter": args.adapter, **ranks.to_dict()}
    show_text = emit_json(report, args.json, json_path)
    if plot_path is not None:
        plot_ranks(report, plot_path)
    if show_text:
        print(format_report(report, args.top))
    return 0


def format_report(report: Mapping, top: int | None = None) -> str:
    """The report as readable lines: layout, counts, the rank summary and a per-module table."""
    summary, r, trainable = report["summary"], report["r"], report["trainable"]
    lora_rank = report["lora_rank_same_budget"]
    same_budget = f"r={lora_rank} ({report['lora_params_same_budget']:,})" if lora_rank else "none (below r=1)"
    lines = [
        (f"GFA adapter {report['adapter']}: r = {r}, scale {report['scale']:g}, N = {report['N']} modules, "
         f"d = {report['d']:,}"),
        f"global matrix m x k = {report['m']:,} x {report['k']:,}, padding {report['padding']:,}",
        (f"trainable: GFA r(m+k){' + N gains' if report['module_gain'] else ''} = {trainable:,}; LoRA at the "
         f"same rank {report['lora_params_same_rank']:,}"),
        (f"LoRA r=1: {report['lora_params_rank1']:,} (GFA = {trainable / report['lora_params_rank1']:.3f}x); "
         f"the LoRA rank nearest GFA's count: {same_budget}"),
    ]
    if report["zero_update"]:
        lines.append("the update is exactly zero (B = 0: an untrained adapter), so every norm and rank is 0")
    else:
        lines += [
            (f"realized numerical rank (singular values > {report['tol']:g} x the largest): "
             f"max {summary['max_numerical_rank']:,}, median {summary['median_numerical_rank']:g}, "
             f"against the global r = {r}; {summary['modules_above_r']} of {report['N']} modules above r"),
            (f"LoRA realizing every module's rank needs {summary['lora_params_to_realize']:,} parameters, "
             f"{summary['lora_params_to_realize'] / trainable:.3g}x GFA's"),
        ]
    modules = report["modules"]
    if top is not None:
        modules = sorted(modules, key=lambda module: module["norm"], reverse=True)[:top]
    header = ["module", "shape", "norm", "energy %", "num. rank", "stable rank", "max rank"]
    rows = [
        [module["name"], _shape(module), f"{module['norm']:.4g}", f"{100 * module['energy_share']:.2f}",
         str(module["numerical_rank"]), f"{module['stable_rank']:.2f}", str(module["max_rank"])]
        for module in modules
    ]
    lines += ["", text_table(header, rows, left=1)]
    if len(modules) < len(report["modules"]):
        lines.append(f"(the {len(modules)} largest-norm of {len(report['modules'])} modules; without --top: all)")
    return "\n".join(lines)


def _shape(module: Mapping) -> str:
    """p x q, with a convolution's own shape beside the matrix its rank is taken of."""
    shape, matrix = module["shape"], module["matrix_shape"]
    text = "x".join(str(size) for size in matrix)
    return text if len(shape) == 2 else f"{text} ({'x'.join(str(size) for size in shape)})"


def plot_ranks(report: Mapping, path: Path) -> None:
    """Numerical and stable rank of every module in layout order, beside its largest possible rank, and a
    horizontal line at the global rank r. Written atomically."""
    from gfa_peft.io.plots import plt, save_figure  # matplotlib loads (with Agg) only when a plot is drawn
    from matplotlib.ticker import FuncFormatter

    modules = report["modules"]
    positions = range(len(modules))
    # 3 inches beyond the bars for the legend, which sits beside them rather than over them
    figure, axes = plt.subplots(figsize=(max(6.0, 0.25 * len(modules)) + 3, 4.5))
    axes.bar(positions, [module["numerical_rank"] for module in modules], color="C0",
             label=f"numerical rank (tol {report['tol']:g})")
    axes.plot(positions, [module["stable_rank"] for module in modules], "o", color="C1", markersize=4,
              label="stable rank")
    axes.plot(positions, [module["max_rank"] for module in modules], "_", color="black", markersize=12,
              label="largest possible, min(p, q)")
    # Drawn over the bars and thick: r is usually far below the realized ranks, where a thin line disappears.
    axes.axhline(report["r"], color="C3", linestyle="--", linewidth=2, zorder=4,
                 label=f"global rank r = {report['r']}")
    # A log scale keeps r and the realized ranks (often 10-100 x r) apart; symlog, because a zero update has rank 0.
    axes.set_yscale("symlog", linthresh=1)
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.set_ylim(0, 2 * max([report["r"], *(module["max_rank"] for module in modules)]))  # room above the bars
    if len(modules) <= 40:
        axes.set_xticks(list(positions), [module["name"] for module in modules], rotation=90, fontsize=7)
    axes.set_xlabel("module (layout order)")
    axes.set_ylabel("rank of Delta W_i (log scale)")
    axes.set_title(f"realized local ranks: {report['N']} modules, m x k = {report['m']:,} x {report['k']:,}")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0, fontsize=8)  # beside, not over, the bars
    save_figure(figure, path)
