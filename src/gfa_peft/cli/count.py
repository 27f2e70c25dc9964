"""`gfa count`: exact trainable counts and the rank anchors of a model and target set, without weights."""

from __future__ import annotations

import argparse

from gfa_peft.analysis.budget import DEFAULT_ANCHORS, budget_report
from gfa_peft.cli import COMMANDS, UsageError
from gfa_peft.cli.arguments import add_json_argument, emit_json, json_report_path, parse_list, parse_targets
from gfa_peft.data.presets import load_architecture, preset_names
from gfa_peft.io.tables import text_table
from gfa_peft.layout import GRIDS, parse_module_order
from gfa_peft.defaults import ALL_LINEAR


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "count",
        help=COMMANDS["count"],
        description=(
            "Count the trainable parameters of each method for a model and target set, and place every method "
            "at the rank anchors (LoRA's count at ranks 1, 2, 4, ... and the sub-rank-1 anchor 1/2 = 0.3 x LoRA r=1). "
            "GFA takes the rank whose count is nearest each budget, ties to the smaller rank, within [1, min(m, k)]. "
            "The model is built on the meta device from its config: no weights are read or downloaded."
        ),
    )
    parser.add_argument(
        "--model", required=True, metavar="DIR_OR_PRESET",
        help=f"a folder holding config.json (looked for first), or a preset: {', '.join(preset_names())}",
    )
    parser.add_argument(
        "--targets", metavar="NAMES",
        help=f"comma-separated module names (PEFT target_modules semantics: a name matches itself and every "
        f"module ending in '.name') or '{ALL_LINEAR}'; default: PEFT's LoRA default for the model type",
    )
    parser.add_argument(
        "--anchors", default=",".join(DEFAULT_ANCHORS), metavar="LABELS",
        help="comma-separated anchors: '1/2' or LoRA ranks (default: %(default)s)",
    )
    parser.add_argument(
        "--module-order", default="model", metavar="ORDER",
        help="concatenation order: 'model', 'by_name' or an integer seed; it moves module offsets, "
        "not counts (default: %(default)s)",
    )
    parser.add_argument(
        "--grid", choices=GRIDS, default="square",
        help="GFA's global matrix: square (k = floor(sqrt(d))) or aligned (k the multiple of the modules' common "
        "input width nearest sqrt(d)); it sets m and k, so GFA's counts and ranks (default: %(default)s)",
    )
    parser.add_argument(
        "--module-gain", action="store_true",
        help="count GFA with one learned gain per module (GfaConfig(module_gain=True)): N more parameters at "
        "each anchor's rank, as `gfa train --module-gain` places it",
    )
    add_json_argument(parser, "the report", replaces="the table")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    output = json_report_path(args.json)
    anchors = parse_list(args.anchors, "--anchors")
    module_order = parse_module_order(args.module_order)
    try:
        model = load_architecture(args.model)  # an unknown name is refused before torch loads
        from gfa_peft.targets import default_targets, target_shapes  # PEFT loads once there is a model to count
        targets = parse_targets(args.targets) if args.targets else default_targets(model)
        report = budget_report(target_shapes(model, targets), anchors, module_order, args.grid,
                               args.module_gain)
    except (ValueError, TypeError) as error:  # bad names, anchors, orders; modules no method can adapt
        raise UsageError(str(error)) from None
    report = {"model": args.model, "targets": targets, "module_order": module_order, **report}
    if emit_json(report, args.json, output):
        print(format_report(report))
    return 0


def format_report(report: dict) -> str:
    """The report as a readable table."""
    targets = report["targets"] if isinstance(report["targets"], str) else ",".join(report["targets"])
    lines = [
        f"model {report['model']}, targets {targets}: N = {report['N']} modules, d = {report['d']:,}",
        f"global matrix m x k = {report['m']:,} x {report['k']:,} ({report['grid']} grid), padding {report['padding']:,}, "
        f"GFA ranks 1..{report['max_gfa_rank']:,}",
        f"per rank: LoRA {report['lora_per_rank']:,}, GFA m+k = {report['gfa_per_rank']:,}; "
        f"LoRA/GFA at equal rank {report['ratio_exact']:.3f}x exact, {report['ratio_sqrt_n']:.3f}x = sqrt(N) "
        f"(equal-module estimate)" + (f"; GFA's counts include its {report['N']} module gains"
                                     if report["module_gain"] else ""),
        "",
    ]
    header = ["anchor", "budget", "LoRA", "DoRA", "GFA r", "GFA", "GFA/budget", "GFA/LoRA r=1",
              "VeRA r", "VeRA", "VB-LoRA n", "VB-LoRA"]
    rows = [
        [anchor["label"], anchor["budget"], anchor["lora"], anchor["dora"], anchor["gfa_rank"], anchor["gfa"],
         f"{anchor['gfa_fraction']:.3f}", f"{anchor['gfa_vs_lora_r1']:.3f}", anchor["vera_rank"], anchor["vera"],
         anchor["vblora_num_vectors"], anchor["vblora"]]
        for anchor in report["anchors"]
    ]
    lines.append(text_table(header, [[_cell(value) for value in row] for row in rows]))
    smallest = report["smallest"]
    vblora = report["vblora"]
    lines += [
        "",
        "-: the method's smallest configuration exceeds the budget. Smallest counts: "
        + ", ".join(f"{name} {_cell(count)}" for name, count in
                    [("LoRA r=1", smallest["lora"]), ("DoRA r=1", smallest["dora"]), ("GFA r=1", smallest["gfa"]),
                     ("VeRA r=1", smallest["vera"]), (f"VB-LoRA n={vblora['topk']}", smallest["vblora"])]),
        f"DoRA sits at the anchor's LoRA rank; VB-LoRA uses r={vblora['r']}, vector_length="
        f"{_cell(vblora['vector_length'])}, topk={vblora['topk']}; n = its num_vectors.",
    ]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else str(value)
