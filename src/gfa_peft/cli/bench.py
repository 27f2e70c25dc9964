"""`gfa bench`: paired step time and memory of GFA, LoRA, DoRA and the frozen floor at matched rank anchors;
with --inference, paired prefill and decode speed and memory of greedy generation with GFA (unmerged and merged),
LoRA and the bare model."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from gfa_peft.bench.settings import (
    BENCH_METHODS,
    DTYPE_NAMES,
    INFERENCE_METHODS,
    QUICK,
    QUICK_INFERENCE,
    TRAINING_METHODS,
    BenchSettings,
    InferenceSettings,
    Settings,
)
from gfa_peft.bench.shapes import SCOPES, SHAPES
from gfa_peft.cli import COMMANDS, UsageError
from gfa_peft.cli.arguments import add_json_argument, emit_json, json_report_path, parse_list
from gfa_peft.io.files import check_output_folder

FULL = BenchSettings()
FULL_INFERENCE = InferenceSettings()
DEFAULT_OUT = "gfa-bench"
DEFAULT_INFERENCE_OUT = "gfa-bench-inference"
TRAINING_ONLY = {"batch_size": "--batch-size", "seq_len": "--seq-len"}
INFERENCE_ONLY = {"batch_sizes": "--batch-sizes", "prompt_len": "--prompt-len", "new_tokens": "--new-tokens"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help=COMMANDS["bench"],
        description=(
            "Time training steps (forward, backward, AdamW) of GFA, PEFT's LoRA and PEFT's DoRA at the same rank "
            "anchor, beside the floor (every weight frozen, gradients still flowing back to every target module), "
            "on models with public architectures' shapes and random weights. Each method runs in its own process; "
            "the processes of a cell take turns one step at a time, in rounds of alternating order, so that a busy "
            "machine slows them alike. Reported per method: median step time, tokens/s, process CPU time, peak "
            "tensor memory of a step (CPU: from PyTorch's profiler; CUDA: the allocator's statistics), and each as "
            f"a ratio to LoRA's. With --inference, time greedy generation instead (prefill and decode tokens/s, "
            f"memory) of the bare model, LoRA unmerged, GFA unmerged and GFA merged, factors drawn at random, paired "
            f"the same way. Without --quick the full run writes results.json, results.md, plot.png and config.json "
            f"to --out (default {DEFAULT_OUT}/, with --inference {DEFAULT_INFERENCE_OUT}/). See docs/bench.md."
        ),
    )
    parser.add_argument(
        "--inference", action="store_true",
        help="time greedy generation instead of training: methods " + ", ".join(INFERENCE_METHODS)
        + f", anchor {','.join(FULL_INFERENCE.anchors)} unless --anchors is given",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help=f"a few-minute subset: shapes {_names(QUICK.shapes)}, scope {','.join(QUICK.scopes)}, anchor "
        f"{','.join(QUICK.anchors)}, {QUICK.warmup} warm-up, 1 memory and {QUICK.steps} timed steps (with "
        f"--inference: batch size {','.join(map(str, QUICK_INFERENCE.batch_sizes))}, {QUICK_INFERENCE.steps} timed "
        "calls); flags given still apply",
    )
    parser.add_argument(
        "--shapes", metavar="NAMES",
        help="comma-separated model shapes: "
        + "; ".join(f"{name} ({shapes.description})" for name, shapes in SHAPES.items())
        + f" (default: {_names(FULL.shapes)})",
    )
    parser.add_argument(
        "--scopes", metavar="NAMES", help=f"comma-separated target scopes from {', '.join(SCOPES)} (default: all)"
    )
    parser.add_argument(
        "--anchors", metavar="LABELS",
        help="comma-separated rank anchors: '1/2' (GFA only, against LoRA r=1) or LoRA ranks "
        f"(default: {','.join(FULL.anchors)})",
    )
    parser.add_argument(
        "--methods", metavar="NAMES",
        help=f"comma-separated methods from {', '.join(TRAINING_METHODS)} (default: {','.join(BENCH_METHODS)}; "
        "gfa-gain is GFA with a learned gain per module (GfaConfig.module_gain); wgrad, the weight-gradient floor, "
        "is the floor plus every target module's weight gradient: the least work of an exact GFA gradient); "
        f"with --inference from {', '.join(INFERENCE_METHODS)} (default: all)",
    )
    parser.add_argument(
        "--steps", type=int, metavar="N",
        help=f"timed steps per method (default: {FULL.steps}); with --inference timed generate calls "
        f"(default: {FULL_INFERENCE.steps})",
    )
    parser.add_argument(
        "--warmup", type=int, metavar="N",
        help=f"untimed steps per method before the one that measures memory (default: {FULL.warmup})",
    )
    parser.add_argument("--batch-size", type=int, metavar="N", help=f"sequences a step (default: {FULL.batch_size})")
    parser.add_argument(
        "--seq-len", type=int, metavar="N",
        help=f"tokens a sequence (default: {FULL.seq_len}; {FULL.tokens:,} tokens a step with the default batch)",
    )
    parser.add_argument(
        "--batch-sizes", metavar="NS",
        help="--inference: comma-separated batch sizes, each its own cell "
        f"(default: {','.join(map(str, FULL_INFERENCE.batch_sizes))})",
    )
    parser.add_argument(
        "--prompt-len", type=int, metavar="N",
        help=f"--inference: prompt tokens a sequence (default: {FULL_INFERENCE.prompt_len})",
    )
    parser.add_argument(
        "--new-tokens", type=int, metavar="N",
        help=f"--inference: tokens generated a sequence (default: {FULL_INFERENCE.new_tokens})",
    )
    parser.add_argument("--device", metavar="DEVICE", help=f"'cpu' or 'cuda[:N]' (default: {FULL.device})")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help=f"weights' dtype (default: {FULL.dtype})")
    parser.add_argument(
        "--threads", type=int, metavar="N",
        help=f"torch threads per process (default: the cores available, here {FULL.threads})",
    )
    parser.add_argument(
        "--seed", type=int, metavar="N",
        help=f"seed of the weights and tokens, the same for every method (default: {FULL.seed})",
    )
    add_json_argument(parser, "the records (one per cell and method, a list)", replaces="the tables")
    parser.add_argument(
        "--out", metavar="DIR",
        help="write results.json, results.md, plot.png and config.json to DIR "
        f"(default: {DEFAULT_OUT}, with --inference {DEFAULT_INFERENCE_OUT}, for the full run; nothing for --quick)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from gfa_peft.bench.plan import plan, run_bench  # torch loads once a benchmark runs
    from gfa_peft.bench.report import BENCH, format_summary, format_tables, write_outputs

    settings = settings_from(args)
    try:
        groups = len(plan(settings))
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from None
    json_path = json_report_path(args.json)
    out = args.out or (None if args.quick else DEFAULT_INFERENCE_OUT if args.inference else DEFAULT_OUT)
    out_folder = _folder_path(out) if out else None
    if out_folder is not None:  # a folder of other files is refused now, not after the first group
        check_output_folder(out_folder, BENCH, overwrite=True)
    earlier = _stopped_run(out_folder, settings) if out_folder is not None else None
    measured, earlier_wall_s = (earlier["records"], earlier["wall_s"]) if earlier else ([], 0.0)

    started, load_before, clock = datetime.now(timezone.utc), _load(), time.perf_counter()

    def run_line(done: int, total: int) -> str:
        return (
            f"{settings.device} {settings.dtype}, {settings.threads} threads, {_work(settings)}, {settings.warmup} "
            f"warm-up + 1 memory + {settings.steps} timed {'calls' if args.inference else 'steps'} per method, "
            f"wall time {earlier_wall_s + time.perf_counter() - clock:.0f} s"
            + ("" if done == total else f"; PARTIAL: {done} of {total} groups measured so far")
        )

    def save(records: list[dict], done: int, total: int) -> list[Path]:
        config = _run_config(settings, args, started, earlier_wall_s + time.perf_counter() - clock, load_before)
        if earlier:
            config["resumed"] = earlier["resumed"] + [{"started": started.isoformat(timespec="seconds"),
                                                       "groups_measured_before": earlier["groups_measured"]}]
        return write_outputs(out_folder, records, {**config, "groups_measured": done, "groups": total},
                             run_line(done, total))

    def save_partial(records: list[dict], done: int, total: int) -> None:  # a stopped run keeps what it measured
        if out_folder is not None and done < total:
            save(records, done, total)

    if earlier:
        print(f"resuming the run stopped in {str(out_folder)!r}: {earlier['groups_measured']} of {groups} groups "
              "measured there are kept", file=sys.stderr)
    records = run_bench(settings, progress=not args.no_progress, after_group=save_partial, measured=measured)
    if emit_json(records, args.json, json_path):
        print(format_tables(records), format_summary(records), run_line(groups, groups), sep="\n\n")
    if out_folder is not None:
        written = save(records, groups, groups)
        print("wrote " + ", ".join(str(path) for path in written), file=sys.stderr)
    return 0


def _stopped_run(folder: Path, settings: Settings) -> dict | None:
    """The earlier run that `folder` holds, when it stopped part-way with the same settings: its records, wall
    time, groups measured and earlier resumptions, for this run to finish. None when the folder holds no run or a
    finished one (replaced, as any finished run is). A stopped run of other settings is refused rather than
    replaced: it may be an hour of measurement."""
    from gfa_peft.bench.report import OUTPUT_FILES

    results_path, config_path = folder / OUTPUT_FILES[0], folder / OUTPUT_FILES[3]
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text())
        stopped = config["groups_measured"] < config["groups"]
        if not stopped:
            return None
        records = json.loads(results_path.read_text())
        same = config["settings"] == _settings_record(settings)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"--out {str(folder)!r}: its {OUTPUT_FILES[3]} or {OUTPUT_FILES[0]} cannot be read "
                         f"({error}); give another --out or remove the folder") from None
    if not same:
        raise UsageError(f"--out {str(folder)!r} holds a run stopped part-way with other settings "
                         f"({config['groups_measured']} of {config['groups']} groups measured); to finish it, run "
                         "its command again (config.json 'arguments'); to start another, give another --out")
    return {"records": records, "wall_s": config.get("wall_s", 0.0), "groups_measured": config["groups_measured"],
            "resumed": config.get("resumed", [])}


def _settings_record(settings: Settings) -> dict:
    """The settings as config.json records them (JSON types), so that two runs' can be compared."""
    return json.loads(json.dumps({
        **dataclasses.asdict(settings),
        "shapes": [{"name": shapes.name, "preset": shapes.preset, "changes": dict(shapes.changes),
                    "description": shapes.description} for shapes in settings.shapes],
        **({"tokens": settings.tokens} if isinstance(settings, BenchSettings) else {}),
    }))


def _work(settings: Settings) -> str:
    """What one step is, for the run line."""
    if isinstance(settings, InferenceSettings):
        return (f"greedy generate of {settings.new_tokens} tokens after a {settings.prompt_len}-token prompt, batch "
                f"{','.join(map(str, settings.batch_sizes))}")
    return f"{settings.tokens:,} tokens a step ({settings.batch_size} x {settings.seq_len})"


def settings_from(args: argparse.Namespace) -> Settings:
    """The full run's settings, or `QUICK`'s with --quick (with --inference: the inference bench's), with every
    flag given applied on top."""
    if args.inference:
        base = QUICK_INFERENCE if args.quick else FULL_INFERENCE
    else:
        base = QUICK if args.quick else FULL
    given = {
        "shapes": _names_given(args.shapes, "--shapes"),
        "scopes": _names_given(args.scopes, "--scopes"),
        "anchors": _names_given(args.anchors, "--anchors"),
        "methods": _names_given(args.methods, "--methods"),
        "steps": args.steps,
        "warmup": args.warmup,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "batch_sizes": _integers_given(args.batch_sizes, "--batch-sizes"),
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "seed": args.seed,
    }
    if given["shapes"] is not None:
        unknown = [name for name in given["shapes"] if name not in SHAPES]
        if unknown:
            raise UsageError(f"unknown shapes {', '.join(map(repr, unknown))}; choose from {', '.join(SHAPES)}")
        given["shapes"] = tuple(SHAPES[name] for name in given["shapes"])
    given = {key: value for key, value in given.items() if value is not None}
    other_bench = TRAINING_ONLY if args.inference else INFERENCE_ONLY
    misplaced = [flag for key, flag in other_bench.items() if key in given]
    if misplaced:
        raise UsageError(f"{', '.join(misplaced)} {'is' if len(misplaced) == 1 else 'are'} "
                         + ("the training bench's: not with --inference" if args.inference else "for --inference only"))
    return dataclasses.replace(base, **given)


def _integers_given(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    items = parse_list(text, flag)
    try:
        return tuple(int(item) for item in items)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: give whole numbers, e.g. 1,8") from None


def _names_given(text: str | None, flag: str) -> tuple[str, ...] | None:
    return None if text is None else tuple(parse_list(text, flag))


def _folder_path(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {text!r} exists and is not a folder")
    if not path.parent.is_dir():
        raise UsageError(f"cannot write --out {text!r}: folder {str(path.parent)!r} does not exist")
    return path


def _run_config(settings: Settings, args: argparse.Namespace, started: datetime, wall_s: float,
                load_before: list[float] | None) -> dict:
    """The settings and the machine, so that a result can be read (and rerun) later."""
    import peft
    import torch
    import transformers

    device = torch.device(settings.device)
    return {
        "settings": _settings_record(settings),
        "arguments": {name: value for name, value in vars(args).items() if not callable(value)},
        "started": started.isoformat(timespec="seconds"),
        "wall_s": wall_s,
        "load_average_before": load_before,
        "load_average_after": _load(),
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }


def _load() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: how busy the (shared) machine was."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _names(shapes) -> str:
    return ",".join(item.name for item in shapes)
