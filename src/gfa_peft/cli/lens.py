"""`gfa lens`: the approximation lens of Section 3 on a proxy target update, budget by budget."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from gfa_peft.analysis.budget import DEFAULT_ANCHORS
from gfa_peft.cli import COMMANDS, UsageError
from gfa_peft.cli.arguments import (add_json_argument, emit_json, json_report_path, output_path, own_output_path,
                                   parse_list, parse_targets, plot_output_path)
from gfa_peft.defaults import ALL_LINEAR, DEFAULT_GRID_POINTS, DEFAULT_RTOL, DEFAULT_TIE_TOLERANCE
from gfa_peft.layout import parse_module_order

if TYPE_CHECKING:
    import torch


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "lens",
        help=COMMANDS["lens"],
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
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the randomized SVD (default: %(default)s)")
    add_json_argument(parser, "the report", replaces="the table")
    parser.add_argument("--plot", metavar="FILE",
                        help="plot E / ||Delta*||^2 against the budget (log x) to FILE (.png)")
    parser.add_argument("--save-deltas", metavar="FILE",
                        help="also save Delta* as safetensors, to rerun the lens with --deltas FILE")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    json_path = json_report_path(args.json)
    plot_path, deltas_path = plot_output_path(args.plot), output_path(args.save_deltas)
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
    from gfa_peft.analysis.lens.inputs import is_saved_deltas, save_deltas  # torch loads once the arguments are checked
    from gfa_peft.analysis.lens.study import format_report, lens_study, plot_lens

    deltas_path = own_output_path(args.save_deltas, is_saved_deltas, "a deltas file gfa lens saved")

    try:
        deltas = _load_deltas(args, targets)
        data = lens_study(deltas, orders, anchor_labels, budgets, args.grid_points,
                          tie_tolerance=args.tie_tolerance, rtol=args.rtol, seed=args.seed,
                          progress=args.json != "-")
    except (ValueError, TypeError, OSError) as error:
        raise UsageError(str(error)) from None
    data = {"source": _describe_source(args), "targets": targets, **data}

    if deltas_path is not None:
        save_deltas(deltas_path, deltas)
    show_text = emit_json(data, args.json, json_path)
    if plot_path is not None:
        plot_lens(data, plot_path)
    if show_text:
        print(format_report(data))
    return 0


def _load_deltas(args: argparse.Namespace, targets) -> dict[str, torch.Tensor]:
    from gfa_peft.analysis.lens.inputs import deltas_from_adapter, deltas_from_file, deltas_from_models

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


