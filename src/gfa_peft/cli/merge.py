"""`gfa merge`: write a GFA adapter into a copy of its base checkpoint, shard by shard."""

from __future__ import annotations

import argparse
from pathlib import Path

from gfa_peft.cli import COMMANDS, UsageError
from gfa_peft.cli.arguments import add_json_argument, emit_json, json_report_path
from gfa_peft.io.files import check_output_folder


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help=COMMANDS["merge"],
        description=(
            "Write the base checkpoint with every adapted weight replaced by W + scale * its slice of B A, "
            "reading and writing one shard at a time (memory: one shard plus one module's update; the model "
            "is never loaded). The output loads with plain transformers (AutoModelForCausalLM.from_pretrained, or "
            "AutoModelForSequenceClassification for a classifier adapter: a bare encoder's checkpoint gets its "
            "trained head and a config naming the classifier) and gives the adapted model's outputs. Config, "
            "tokenizer and other non-weight files are copied; weights in other formats (.bin, ...) are left out and listed in the summary. Everything is checked "
            "before anything is written; OUT is built under a temporary name and renamed into place."
        ),
    )
    parser.add_argument("adapter", metavar="ADAPTER", help="a saved GFA adapter folder (adapter_config.json + weights)")
    parser.add_argument("--base", required=True, metavar="DIR",
                        help="the base model folder: config.json and model.safetensors or a sharded "
                        "model.safetensors.index.json")
    parser.add_argument("--out", required=True, metavar="DIR", help="the merged model folder to create")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a merged model in OUT (only once the new one is complete); a folder of "
                        "other files, or one holding ADAPTER or the base, is never replaced")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_json_argument(parser, "the summary", replaces="the readable summary")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    adapter, base, out = Path(args.adapter), Path(args.base), Path(args.out)
    summary_path = json_report_path(args.json, args.overwrite)
    for flag, folder in (("ADAPTER", adapter), ("--base", base)):
        if not folder.is_dir():
            raise UsageError(f"{flag} {str(folder)!r} is not a folder")
    if not out.parent.is_dir():
        raise UsageError(f"cannot create --out {str(out)!r}: folder {str(out.parent)!r} does not exist")
    from gfa_peft.adapters.merge import MERGED, plan_merge, write_merged  # torch loads once the arguments are checked

    check_output_folder(out, MERGED, args.overwrite, inputs=(adapter, base))  # before the slow checks
    try:
        plan = plan_merge(adapter, base)
    except (ValueError, TypeError, OSError) as error:  # files that do not fit, are missing or unreadable
        raise UsageError(str(error)) from None
    written = write_merged(plan, out, overwrite=args.overwrite, progress=not args.no_progress)
    summary = {"adapter": str(adapter), **written}
    if emit_json(summary, args.json, summary_path):
        print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    """What was merged and written, in a few lines."""
    lines = [
        f"merged {summary['merged_modules']} modules of {summary['adapter']} into {summary['base']}",
        f"wrote {summary['out']}: {summary['tensors']:,} tensors in {summary['shards']} shard(s), "
        f"{len(summary['copied_files'])} other file(s) copied",
    ]
    if summary["added_tensors"]:
        lines.append(f"as {summary['architecture']}, adding the adapter's " + ", ".join(summary["added_tensors"]))
    if summary["skipped_weight_files"]:
        lines.append("left out (weights in other formats): " + ", ".join(summary["skipped_weight_files"]))
    return "\n".join(lines)
