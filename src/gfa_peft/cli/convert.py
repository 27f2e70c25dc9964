"""`gfa convert`: a saved GFA adapter as a standard LoRA adapter folder, by PEFT's own `convert_to_lora`."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from gfa_peft.cli import COMMANDS, UsageError
from gfa_peft.cli.arguments import add_json_argument, emit_json, json_report_path, plot_output_path
from gfa_peft.io.tables import text_table


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help=COMMANDS["convert"],
        description=(
            "Write a LoRA adapter folder (adapter_config.json + adapter_model.safetensors) that plain PEFT loads "
            "without this package, for tools that take only LoRA. It is what PEFT's convert_to_lora / save_as_lora "
            "writes for the GFA adapter loaded on its base: each module's update Delta W_i = scale * its slice of "
            "B A becomes its truncated SVD, B_i = U_i S_i and A_i = V_i^T at rank R_i (lora_alpha = R_i, so "
            "scaling 1). The base model's weights are not read (its config.json only, for the module types: "
            "linear layers convert, Conv1D, Conv2d and Embedding are refused). Tensors saved with the adapter "
            "(modules_to_save, e.g. a classifier head) are copied. Prints per module and in total the rank kept, "
            "the relative error ||Delta W - B A||_F / ||Delta W||_F (its square is the discarded singular values' "
            "share of ||Delta W||_F^2) and the LoRA parameter count against GFA's r(m+k). Exact (error at "
            "float32 rounding) once R_i reaches the module's realized rank (`gfa inspect`)."
        ),
    )
    parser.add_argument("adapter", metavar="ADAPTER", help="a saved GFA adapter folder (adapter_config.json + weights)")
    parser.add_argument("--to", choices=("lora",), default="lora", help="the format to write (default: %(default)s)")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, metavar="R", help="one LoRA rank for every module (PEFT's int rank)")
    size.add_argument("--energy", type=float, metavar="E",
                      help="per module, the smallest rank whose singular values hold at least a share E in (0, 1] "
                      "of ||Delta W_i||_F^2 (PEFT's float rank)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the LoRA adapter folder to create")
    parser.add_argument("--base", metavar="DIR",
                        help="the base model folder or preset, for its module types (default: the adapter's "
                        "base_model_name_or_path); the LoRA config records the adapter's base either way")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a LoRA adapter in OUT (only once the new one is complete); a folder of other "
                        "files, or one holding ADAPTER, is never replaced")
    add_json_argument(parser, "the report", replaces="the table")
    parser.add_argument("--plot", metavar="FILE",
                        help="plot the share of the update's energy kept against the LoRA parameter count, for one "
                        "rank for every module and for per-module energy thresholds, to FILE (.png)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    json_path, plot_path = json_report_path(args.json, args.overwrite), plot_output_path(args.plot)
    if args.rank is not None and args.rank < 1:
        raise UsageError(f"--rank must be at least 1, got {args.rank}")
    if args.energy is not None and not 0 < args.energy <= 1:
        raise UsageError(f"--energy must be in (0, 1], got {args.energy}")
    adapter, out = Path(args.adapter), Path(args.out)
    if not out.parent.is_dir():
        raise UsageError(f"cannot create --out {str(out)!r}: folder {str(out.parent)!r} does not exist")
    # torch, transformers and PEFT load once the arguments are checked
    from gfa_peft.adapters.lora import LORA_ADAPTER, convert_saved_adapter, energy_curves, write_lora_adapter
    from gfa_peft.io.files import check_output_folder

    check_output_folder(out, LORA_ADAPTER, args.overwrite, inputs=(adapter,))  # before the slow part
    try:
        conversion = convert_saved_adapter(adapter, args.rank if args.rank is not None else args.energy, args.base)
    except (ValueError, TypeError, OSError) as error:  # not a GFA adapter, no such base, a module LoRA cannot take
        raise UsageError(str(error)) from None
    write_lora_adapter(conversion, out, args.overwrite, inputs=(adapter,))
    chosen = {"rank": args.rank} if args.rank is not None else {"energy": args.energy}
    report = {"adapter": str(adapter), "out": str(out), **chosen, **conversion.to_dict()}
    show_text = emit_json(report, args.json, json_path)
    if plot_path is not None:
        plot_energy(energy_curves(conversion.modules), report, plot_path)
    if show_text:
        print(format_report(report))
    return 0


def format_report(report: Mapping) -> str:
    """The report as readable lines: the totals, then one row per module."""
    chosen = f"--rank {report['rank']}" if "rank" in report else f"--energy {report['energy']:g}"
    lines = [
        f"converted GFA adapter {report['adapter']} to LoRA ({chosen}); wrote {report['out']}",
        (f"LoRA parameters {report['lora_params']:,} against GFA's {report['gfa_params']:,} "
         f"({report['lora_params'] / report['gfa_params']:.3g}x); ranks {report['rank_min']}-{report['rank_max']}, "
         f"median {report['rank_median']:g}"),
        (f"relative error of the whole update ||dW - B A||_F / ||dW||_F = {report['relative_error']:.3g} "
         f"(energy kept {100 * report['energy_kept']:.4g}%)"),
    ]
    if report["carried"]:
        lines.append(f"copied as saved (not counted above): {', '.join(report['carried'])}")
    header = ["module", "shape", "rank", "max rank", "energy kept %", "rel. error", "LoRA params"]
    rows = [
        [module["name"], "x".join(str(size) for size in module["shape"]), str(module["rank"]),
         str(module["max_rank"]), f"{100 * module['energy_kept']:.4g}", f"{module['relative_error']:.3g}",
         f"{module['lora_params']:,}"]
        for module in report["modules"]
    ]
    return "\n".join([*lines, "", text_table(header, rows, left=1)])


def plot_energy(curves: Mapping[str, list[tuple[int, float]]], report: Mapping, path: Path) -> None:
    """Energy kept against LoRA parameters for each way of choosing ranks, with GFA's count and the chosen
    conversion marked. Written atomically."""
    from gfa_peft.io.plots import log_count_axis, plt, save_figure  # matplotlib loads (Agg) only when plotting

    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    for (label, points), style in zip(curves.items(), ("o-", "s--")):
        axes.plot([params for params, _ in points], [100 * energy for _, energy in points], style, markersize=3,
                  label=label)
    axes.axvline(report["gfa_params"], color="C3", linestyle=":", label=f"GFA r(m+k) = {report['gfa_params']:,}")
    axes.plot([report["lora_params"]], [100 * report["energy_kept"]], "*", color="black", markersize=12,
              label=f"this conversion ({report['lora_params']:,})")
    log_count_axis(axes)
    axes.set_xlabel("LoRA parameters (log scale)")
    axes.set_ylabel("share of ||Delta W||_F^2 kept (%)")
    axes.set_title(f"GFA -> LoRA: {len(report['modules'])} modules")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    save_figure(figure, path)
