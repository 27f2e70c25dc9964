"""`gfa merge`: write a GFA adapter into a copy of its base checkpoint, shard by shard."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gfa_peft.cli import COMMANDS, UsageError
from gfa_peft.cli.arguments import output_path
from gfa_peft.adapters.merge import MERGED, plan_merge, write_merged
from gfa_peft.io.files import check_output_folder, write_json_atomic


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help=COMMANDS["merge"],
        description=(
            "Write the base checkpoint with every adapted weight replaced by W + scale * its slice of B A, "
            "reading and writing one shard at a time (memory: one shard plus one module's update; the model "
            "is never loaded). The output loads with plain transformers (AutoModelForCausalLM.from_pretrained) "
            "and gives the adapted model's outputs. Config, tokenizer and other non-weight files are copied; "
            "weights in other formats (.bin, ...) are left out and listed in the summary. Everything is checked "
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
    parser.add_argument("--json", metavar="FILE",
                        help="also write the summary (printed as JSON on stdout) to FILE")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    adapter, base, out = Path(args.adapter), Path(args.base), Path(args.out)
    summary_path = output_path(args.json)
    for flag, folder in (("ADAPTER", adapter), ("--base", base)):
        if not folder.is_dir():
            raise UsageError(f"{flag} {str(folder)!r} is not a folder")
    if not out.parent.is_dir():
        raise UsageError(f"cannot create --out {str(out)!r}: folder {str(out.parent)!r} does not exist")
    check_output_folder(out, MERGED, args.overwrite, inputs=(adapter, base))  # before the slow checks
    try:
        plan = plan_merge(adapter, base)
    except (ValueError, TypeError, OSError) as error:  # files that do not fit, are missing or unreadable
        raise UsageError(str(error)) from None
    written = write_merged(plan, out, overwrite=args.overwrite, progress=not args.no_progress)
    summary = {"adapter": str(adapter), **written}
    if summary_path is not None:
        write_json_atomic(summary_path, summary)
    json.dump(summary, sys.stdout, indent=2)
    print()
    return 0
