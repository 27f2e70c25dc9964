"""`gfa demo`: the README's main job, a small sweep on the bundled model and task (7 min on an idle 2-core machine)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gfa_peft.cli import COMMANDS
from gfa_peft.cli.arguments import add_json_argument, emit_json, json_report_path
from gfa_peft.cli.sweep import run_spec

DEMO = {"model": "minilm", "tasks": ("rt",), "methods": ("gfa", "lora", "dora"), "anchors": ("1/2", "1", "4", "16"),
        "seeds": (0,), "settings": {}}
"""The demo's SweepSpec fields: MiniLM on Rotten Tomatoes; GFA, LoRA and DoRA at anchors 1/2 (GFA only), 1, 4 and
16; one seed: 10 runs."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help=COMMANDS["demo"],
        description=(
            "The sweep `gfa sweep --model minilm --tasks rt --methods gfa,lora,dora --anchors 1/2,1,4,16 --seeds 0`: "
            "GFA at the sub-LoRA-r=1 budget 1/2 and at the budgets of LoRA ranks 1, 4 and 16, LoRA and DoRA at those "
            "ranks, each trained with the recipe and tuned learning rate of docs/training.md and tested on the "
            "rt test split. Prints the table (with the majority-class baseline, GFA-vs-DoRA verdicts and GFA's "
            "retention at 1/2), a legend of its terms and the figure's path. Needs `gfa assets install` first. "
            "Resumes if interrupted."
        ),
    )
    parser.add_argument("--out", default="runs/demo", metavar="DIR", help="the demo's folder (default: %(default)s)")
    parser.add_argument("--cache", metavar="DIR", help="asset cache folder (default: $GFA_CACHE or ~/.cache/gfa-peft)")
    parser.add_argument("--no-progress", action="store_true", help="no per-run progress bars")
    add_json_argument(parser, "the summary (as the folder's results.json)", replaces="the tables and legend")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    json_path = json_report_path(args.json)
    from gfa_peft.training.sweep import SweepSpec, format_legend, format_summary  # torch loads once the demo runs

    settings = DEMO["settings"] if args.cache is None else {**DEMO["settings"], "cache": args.cache}
    summary = run_spec(SweepSpec(**{**DEMO, "settings": settings}), Path(args.out), progress=not args.no_progress)
    if emit_json(summary, args.json, json_path):
        print(format_summary(summary), format_legend(summary), sep="\n\n")
    return 0
