"""`gfa bench`: per-step time and memory of GFA, LoRA and DoRA at matched rank anchors, paired.

A cell is (shapes, scope, anchor). GFA sits at the anchor's GFA rank, LoRA and DoRA (PEFT's own) at its LoRA
rank, and the floor is the same model with every weight frozen but gradients still flowing back from the loss
to every target module's output: no adapter on those modules can train for less, so each method's overhead
shows against it.

The methods of a cell are measured side by side: one worker process each (so that each one's memory is its
own), all alive at once, driven one training step at a time in rounds whose order alternates,
A B C D, D C B A, A B C D, ... Only one worker computes at any moment, and a slow phase of a shared machine
hits every method alike instead of whichever happened to run then. The sub-rank-1 anchor "1/2" has no LoRA
or DoRA; its GFA runs in the group of anchor "1", and LoRA r = 1 is its reference for every ratio (LoRA r = 1
is run for that even when anchor "1" is not asked for).

Each worker runs `warmup` untimed steps (the first creates AdamW's state), one more untimed step with its
memory measured (see `bench_worker.py`), then `steps` timed ones; a method's step time is the median of its
timed steps.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gfa_peft.analysis.budget import SUB_RANK1_LABEL, rank_anchors
from gfa_peft.bench.settings import BENCH_METHODS, BenchSettings
from gfa_peft.bench.shapes import SCOPES, BenchShapes
from gfa_peft.bench.worker import DTYPES, WorkerHandle, WorkerSpec
from gfa_peft.targets import target_shapes

REFERENCE = "lora"


@dataclass(frozen=True)
class Run:
    """One method at one anchor of one (shapes, scope): one worker process."""

    shapes: BenchShapes
    scope: str
    anchor: str
    method: str
    rank: int | None

    @property
    def cell(self) -> str:
        return cell_name(self.shapes.name, self.scope, self.anchor)


def cell_name(shapes: str, scope: str, anchor: str) -> str:
    return f"{shapes}/{scope}/{anchor}"


def reference_anchor(anchor: str) -> str:
    """The anchor whose LoRA a cell's ratios divide by: its own, or "1" for the sub-rank-1 anchor."""
    return "1" if anchor == SUB_RANK1_LABEL else anchor


def plan(settings: BenchSettings) -> list[list[Run]]:
    """The process groups to run, each a list of runs measured side by side.

    Raises ValueError for any bad setting (an unknown name, an anchor out of range, ...), before anything runs.
    """
    _check(settings)
    groups = []
    for shapes in settings.shapes:
        meta_model = shapes.build("meta")
        for scope in settings.scopes:
            anchors = rank_anchors(target_shapes(meta_model, SCOPES[scope]), settings.anchors)
            for reference in dict.fromkeys(reference_anchor(anchor.label) for anchor in anchors):
                members = [anchor for anchor in anchors if reference_anchor(anchor.label) == reference]
                reference_asked_for = any(anchor.label == reference for anchor in members)  # not only "1/2"
                runs = []
                for method in settings.methods:
                    if method == "gfa":
                        runs += [Run(shapes, scope, anchor.label, method, anchor.gfa_rank) for anchor in members]
                    elif method == "floor":
                        runs.append(Run(shapes, scope, reference, method, None))
                    elif method == REFERENCE or reference_asked_for:
                        runs.append(Run(shapes, scope, reference, method, int(reference)))
                groups.append(runs)
    return groups


def _check(settings: BenchSettings) -> None:
    for name, value, least in [("steps", settings.steps, 1), ("warmup", settings.warmup, 1),
                               ("batch size", settings.batch_size, 1), ("sequence length", settings.seq_len, 2),
                               ("threads", settings.threads, 1)]:
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")
    _check_names("method", settings.methods, BENCH_METHODS)
    _check_names("scope", settings.scopes, SCOPES)
    _check_names("dtype", [settings.dtype], DTYPES)
    _check_names("shapes", [shapes.name for shapes in settings.shapes])
    if not settings.anchors:
        raise ValueError("no anchor given")
    try:
        device_type = torch.device(settings.device).type
    except RuntimeError:
        device_type = None
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device {settings.device!r}: the bench runs on 'cpu' or 'cuda[:N]'")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {settings.device!r} asked for, but CUDA is not available here")


def _check_names(what: str, given: Sequence[str], allowed: Sequence[str] | None = None) -> None:
    """Each name given once, and (when `allowed` is given) known."""
    if not given:
        raise ValueError(f"no {what} given")
    unknown = [name for name in given if name not in allowed] if allowed is not None else []
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(map(repr, unknown))}; choose from {', '.join(allowed)}")
    repeated = sorted({name for name in given if list(given).count(name) > 1})
    if repeated:
        raise ValueError(f"{what} {', '.join(map(repr, repeated))} given more than once")


def run_bench(settings: BenchSettings, progress: bool = True,
              after_group: Callable[[list[dict], int, int], object] = lambda records, done, total: None) -> list[dict]:
    """Measure every run of `plan(settings)`; one record per (cell, method), ratios to LoRA included.
    After each group, `after_group(records so far with ratios, groups done, groups in all)`, e.g. to save a long
    run as it goes.

    Record keys: cell, shapes, scope, anchor, method, rank, trainable, tokens, device, dtype, threads,
    step_time_s (median), step_times_s (every timed step), cpu_time_s (median process CPU seconds over all
    threads; None on CUDA), cpu_times_s, tokens_per_s, resting_mem_mb, peak_mem_mb, step_mem_mb (MiB), and
    from `add_ratios`: reference, time_ratio_to_lora, cpu_time_ratio_to_lora, mem_ratio_to_lora (peak) and
    step_mem_ratio_to_lora.
    """
    groups = plan(settings)
    steps = sum(len(runs) for runs in groups) * rounds(settings)
    bar = tqdm(total=steps, desc="gfa bench", unit="step", disable=not progress)
    records = []
    with tempfile.TemporaryDirectory(prefix="gfa-bench-logs-") as log_dir, bar:
        for done, runs in enumerate(groups, 1):
            bar.set_postfix_str(f"{runs[0].shapes.name} {runs[0].scope} r={reference_anchor(runs[0].anchor)}")
            records += measure_group(runs, settings, Path(log_dir), on_step=lambda: bar.update())
            after_group(add_ratios(records), done, len(groups))
    return add_ratios(records)


def rounds(settings: BenchSettings) -> int:
    """Steps each worker runs: the warm-up, one with its memory measured, the timed ones."""
    return settings.warmup + 1 + settings.steps


def measure_group(runs: Sequence[Run], settings: BenchSettings, log_dir: Path, on_step=lambda: None) -> list[dict]:
    """Run the group's workers side by side in alternating rounds; one record per run (ratios not yet added)."""
    workers = []
    try:
        for index, run in enumerate(runs):
            spec = WorkerSpec(run.shapes, run.scope, run.method, run.rank, settings.batch_size, settings.seq_len,
                              settings.device, settings.dtype, settings.threads, settings.seed)
            workers.append(WorkerHandle(spec, log_dir / f"{index}-{run.method}.log"))
        ready = [worker.receive("ready") for worker in workers]
        memory: list[dict] = [{} for _ in runs]
        timings: list[list[dict]] = [[] for _ in runs]
        for round_index in range(rounds(settings)):
            order = range(len(runs)) if round_index % 2 == 0 else reversed(range(len(runs)))
            for index in order:
                if round_index < settings.warmup:
                    workers[index].ask("step")
                elif round_index == settings.warmup:
                    memory[index] = workers[index].ask("memory")
                else:
                    timings[index].append(workers[index].ask("step"))
                on_step()
    finally:
        for worker in workers:
            worker.stop()
    return [_record(run, settings, start["trainable"], steps, held)
            for run, start, steps, held in zip(runs, ready, timings, memory)]


def _record(run: Run, settings: BenchSettings, trainable: int, steps: list[dict], memory: dict) -> dict:
    wall = [step["wall_s"] for step in steps]
    cpu = [step["cpu_s"] for step in steps] if torch.device(settings.device).type == "cpu" else None
    step_time = statistics.median(wall)
    return {
        "cell": run.cell,
        "shapes": run.shapes.name,
        "scope": run.scope,
        "anchor": run.anchor,
        "method": run.method,
        "rank": run.rank,
        "trainable": trainable,
        "tokens": settings.tokens,
        "device": settings.device,
        "dtype": settings.dtype,
        "threads": settings.threads,
        "step_time_s": step_time,
        "step_times_s": wall,
        "cpu_time_s": statistics.median(cpu) if cpu else None,
        "cpu_times_s": cpu,
        "tokens_per_s": settings.tokens / step_time,
        **memory,
    }


RATIOS = {
    "time_ratio_to_lora": "step_time_s",
    "cpu_time_ratio_to_lora": "cpu_time_s",
    "mem_ratio_to_lora": "peak_mem_mb",
    "step_mem_ratio_to_lora": "step_mem_mb",
}
"""Each ratio key and the quantity it divides by LoRA's, in the cell of `reference_anchor`."""


def add_ratios(records: Sequence[dict]) -> list[dict]:
    """The records with `reference` (the LoRA cell divided by, None without one) and every ratio in `RATIOS`."""
    lora = {record["cell"]: record for record in records if record["method"] == REFERENCE}
    result = []
    for record in records:
        reference = lora.get(cell_name(record["shapes"], record["scope"], reference_anchor(record["anchor"])))
        ratios = {
            ratio: record[key] / reference[key] if reference and record[key] is not None and reference[key] else None
            for ratio, key in RATIOS.items()
        }
        result.append({**record, "reference": reference["cell"] if reference else None, **ratios})
    return result
