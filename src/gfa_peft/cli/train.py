"""`gfa train`: fine-tune one model on one task with one method at one budget, and evaluate it."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gfa_peft.cli import COMMANDS, UsageError
from gfa_peft.cli.arguments import add_json_argument, emit_json, json_report_path, parse_targets
from gfa_peft.data.task_registry import check_task_name
from gfa_peft.io.tables import text_table
from gfa_peft.training.config import NAMED_CHOICES, RunConfig, RunConfigError, flag


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help=COMMANDS["train"],
        description=(
            "Train with transformers' Trainer and evaluate on the task's test split. Every method is placed at the "
            "anchor's budget as `gfa count` shows. The run folder gets config.json, the adapter (or, for full "
            "fine-tuning, the whole tuned model), train_log.json and, last, metrics.json (accuracy, F1 or Matthews "
            "where the task uses them, the majority-class baseline, adapter-only trainable parameters, wall time). "
            "Everything is checked before training starts; nothing is written on bad input. "
            "Runs under `torchrun --nproc_per_node N -m gfa_peft.cli train ...` too (only rank 0 writes)."
        ),
    )
    add_config_arguments(parser)
    parser.add_argument("--runs", default="runs", metavar="DIR",
                        help="root of run folders: the run goes to DIR/<task>/<method>-<anchor>-s<seed> "
                        "(default: %(default)s)")
    parser.add_argument("--out", metavar="DIR", help="the run folder itself, instead of one under --runs")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo a run whose folder holds a finished run (replaced once the new one is complete)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_json_argument(parser, "the metrics")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_task_names(args.task, args.eval_task)
    json_path = json_report_path(args.json)
    from gfa_peft.adapters.distributed import RankMismatchError, rank_and_world  # torch loads once a run starts
    from gfa_peft.training.run import check_run_folder, execute, prepare

    config = config_from_args(args)
    try:
        prepared = prepare(config)
    except RunConfigError as error:
        raise UsageError(str(error)) from None
    folder = Path(args.out) if args.out else Path(args.runs) / prepared.task.name / prepared.name
    check_run_folder(prepared, folder, args.overwrite)  # on every rank, before any of them trains
    try:
        metrics = execute(prepared, folder, progress=not args.no_progress, overwrite=args.overwrite)
    except RankMismatchError as error:  # under torchrun: raised on every rank, before anything is written
        raise UsageError(str(error)) from None
    if rank_and_world()[0] == 0 and emit_json(metrics, args.json, json_path):  # under torchrun: one prints
        print(format_metrics(metrics))
        print(f"run folder: {folder}")
    return 0


def check_task_names(*names: str | None) -> None:
    """Refuse an unknown task name (or mixture member) before torch loads: a typo costs no wait."""
    for name in names:
        if name is not None:
            try:
                check_task_name(name)
            except ValueError as error:
                raise UsageError(str(error)) from None


def format_metrics(metrics: dict[str, Any]) -> str:
    """A run's result as a short table: its scores (per task for a mixture), then its size and time."""
    scores = [name for name in ("accuracy", "f1", "matthews", "majority_baseline") if name in metrics]
    by_task = {metrics["eval_task"]: metrics, **metrics.get("by_task", {})}  # a mixture: its mean, then each task
    rows = [[task, *(f"{100 * values[name]:.1f}" for name in scores)] for task, values in by_task.items()]
    header = ["task", *(f"{name.replace('_', ' ')} %" for name in scores)]
    knobs = ", ".join(f"{name}={value}" for name, value in metrics["knobs"].items())
    return "\n".join([
        f"{metrics['method']}" + (f" at anchor {metrics['anchor']}" if metrics["anchor"] else "")
        + (f" ({knobs})" if knobs else "") + f", seed {metrics['seed']}, lr {metrics['lr']:g}, on "
        f"{metrics['eval_split']} ({metrics['eval_examples']:,} examples)",
        text_table(header, rows),
        f"adapter params {metrics['adapter_params']:,} (trainable {metrics['trainable_params']:,}); "
        f"{metrics['steps']:,} steps, train {metrics['train_seconds']:.0f} s, evaluation "
        f"{metrics['eval_seconds']:.0f} s, wall {metrics['wall_seconds']:.0f} s",
    ])


# ---------------------------------------------------------------- RunConfig <-> flags (shared with sweep, tune)

def add_config_arguments(parser: argparse.ArgumentParser, exclude: Iterable[str] = ()) -> None:
    """One flag per RunConfig field, its help, metavar and default (or what None means) from the field."""
    hints = typing.get_type_hints(RunConfig)
    for item in dataclasses.fields(RunConfig):
        if item.name in exclude:
            continue
        hint = hints[item.name]
        default = item.default
        shown_default = item.metadata["when_unset"] if default is None else default
        help_text = f"{item.metadata['help']} (default: {shown_default})"
        if item.name in NAMED_CHOICES:
            parser.add_argument(flag(item.name), choices=NAMED_CHOICES[item.name], default=default, help=help_text)
        elif hint is bool:
            parser.add_argument(flag(item.name), action="store_true", help=item.metadata["help"])
        else:
            parser.add_argument(flag(item.name), type=_parser_for(item.name, hint), default=default,
                                metavar=item.metadata["metavar"], help=help_text)


def config_from_args(args: argparse.Namespace, **fixed: Any) -> RunConfig:
    """The RunConfig the parsed flags describe; `fixed` sets fields that have no flag."""
    values = {item.name: getattr(args, item.name) for item in dataclasses.fields(RunConfig) if hasattr(args, item.name)}
    return RunConfig(**{**values, **fixed})


def _parser_for(name: str, hint: Any):
    if name == "targets":
        return parse_targets
    return next(arg for arg in typing.get_args(hint) or (hint,) if arg is not type(None))
