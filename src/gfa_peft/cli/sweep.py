"""`gfa sweep`: the grid tasks x methods x anchors x seeds, resumable, with its table, verdicts and figure."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from gfa_peft.cli import COMMANDS, UsageError
from gfa_peft.cli.arguments import comma_list, parse_list
from gfa_peft.cli.train import add_config_arguments, check_task_names, config_from_args
from gfa_peft.training.config import RunConfig, RunConfigError

if TYPE_CHECKING:
    from gfa_peft.training.sweep import SweepSpec

GRID_FIELDS = ("model", "task", "method", "anchor", "rank", "module_order", "seed", "lr", "train_file", "eval_file",
               "eval_task")
"""RunConfig fields that the grid sets (or that a sweep does not vary); the other fields are flags shared by all runs."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help=COMMANDS["sweep"],
        description=(
            "Run `gfa train` over a grid into OUT/<task>/<method>-<anchor>-s<seed>, skipping runs that already "
            "finished (an interrupted sweep resumes; an unfinished run is redone). Every run is checked before any "
            "trains. Cells a method cannot reach (LoRA and DoRA at 1/2, VeRA where `gfa count` shows '-') are left "
            "out. Writes OUT/results.json and OUT/results.csv (mean and std over seeds per cell, in percentage "
            "points), GFA-vs-DoRA verdicts within the tie band (2 x the pooled seed std; the paper's 1.4pp with one "
            "seed), the retention table (accuracy at 1/2 as a fraction of 16) and OUT/accuracy_vs_params.png. "
            "A grid may be run in pieces: sweeps with the same settings into one OUT (say, more seeds at some "
            "anchors) are summarised together, and so are sweeps whose methods differ only in their own settings "
            "(GFA under --scale-rule rsqrt beside LoRA at its default). A method's own setting (--scale-rule, "
            "--b-lr-ratio: gfa, lora, dora; --module-gain, --gradient-init, --grid: gfa) reaches the runs of the "
            "methods that have it; the others run without it."
        ),
    )
    add_grid_arguments(parser)
    parser.add_argument("--lrs", type=float_list, metavar="LR,LR,...",
                        help="run every cell at each of these learning rates (default: each method's tuned rate)")
    parser.add_argument("--module-orders", type=comma_list("--module-orders"), metavar="ORDERS",
                        help="run every GFA cell once per concatenation order: 'model', 'by_name', integer seeds of "
                        "random permutations (the permutation diagnostic; default: the model's order only)")
    parser.add_argument("--out", default="runs/sweep", metavar="DIR", help="the sweep's folder (default: %(default)s)")
    parser.set_defaults(run=run)


def add_grid_arguments(parser: argparse.ArgumentParser, anchors: str = "1/2,1,4,16", exclude: tuple[str, ...] = ()
                       ) -> None:
    """The grid's flags and the RunConfig flags shared by every run but those in `exclude` (also used by
    `gfa tune`)."""
    parser.add_argument("--model", default="minilm", metavar="NAME_OR_DIR",
                        help="'minilm', 'smollm2' or a model folder (default: %(default)s)")
    parser.add_argument("--tasks", type=comma_list("--tasks"), default=["rt"], metavar="NAMES",
                        help="comma-separated tasks (default: rt)")
    parser.add_argument("--methods", type=comma_list("--methods"), default=["gfa", "lora", "dora"], metavar="NAMES",
                        help="comma-separated methods: gfa, lora, dora, vera, vblora, full, zero-shot (the "
                        "pretrained model untrained, once per task; multiple choice only) (default: gfa,lora,dora)")
    parser.add_argument("--anchors", type=comma_list("--anchors"), default=anchors, metavar="LABELS",
                        help=f"comma-separated anchors: '1/2' or LoRA ranks (default: {anchors})")
    parser.add_argument("--seeds", type=int_list, default=[0], metavar="S,S,...", help="comma-separated seeds (default: 0)")
    add_config_arguments(parser, exclude=GRID_FIELDS + exclude)
    parser.add_argument("--rerun-changed", action="store_true",
                        help="train again the finished runs in the folder that were trained with other settings, "
                        "and forget the folder's grids with other settings (without it the sweep names them and "
                        "stops)")
    parser.add_argument("--no-progress", action="store_true", help="no per-run progress bars")


def spec_from_args(args: argparse.Namespace, **settings) -> SweepSpec:
    """The SweepSpec the parsed flags describe; `settings` fixes RunConfig fields that have no flag."""
    from gfa_peft.training.sweep import SweepSpec  # torch loads once a sweep runs

    shared = config_from_args(args, **settings)
    defaults = RunConfig()
    changed = {name: value for name, value in vars(shared).items()
               if name not in GRID_FIELDS and value != getattr(defaults, name)}
    return SweepSpec(model=args.model, tasks=tuple(args.tasks), methods=tuple(args.methods),
                     anchors=tuple(args.anchors), seeds=tuple(args.seeds),
                     learning_rates=tuple(args.lrs) if getattr(args, "lrs", None) else None,
                     module_orders=tuple(args.module_orders) if getattr(args, "module_orders", None) else None,
                     settings=changed)


def run(args: argparse.Namespace) -> int:
    check_task_names(*args.tasks)
    from gfa_peft.training.sweep import format_legend, format_summary  # torch loads once the sweep runs

    summary = run_spec(spec_from_args(args), Path(args.out), progress=not args.no_progress,
                       rerun_changed=args.rerun_changed)
    print(format_summary(summary), format_legend(summary), sep="\n\n")
    return 0


def run_spec(spec: SweepSpec, out: Path, progress: bool = True, rerun_changed: bool = False) -> dict:
    """Run a sweep, turning a run that cannot start into a usage error (raised before anything trains)."""
    from gfa_peft.training.sweep import run_sweep

    if out.exists() and not out.is_dir():
        raise UsageError(f"sweep folder {str(out)!r} is a file")
    try:
        return run_sweep(spec, out, progress, rerun_changed=rerun_changed)
    except RunConfigError as error:
        raise UsageError(str(error)) from None


def int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in parse_list(text, "--seeds")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def float_list(text: str) -> list[float]:
    try:
        values = [float(item) for item in parse_list(text, "--lrs")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not all(value > 0 for value in values):
        raise argparse.ArgumentTypeError(f"learning rates must be positive, got {text!r}")
    return values
