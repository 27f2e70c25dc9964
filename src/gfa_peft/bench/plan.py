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
memory measured (see `worker.py`), then `steps` timed ones; a method's step time is the median of its
timed steps.

`gfa bench --inference` (`InferenceSettings`) runs the same plan, workers and rounds with generation instead of
training: a step is one greedy `generate` call, the methods are the bare model ("base"), LoRA and GFA unmerged
and GFA merged, and each cell also has a batch size. Its warm-up also lets GFA form the adapted weight it reuses.
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
from gfa_peft.bench.settings import (
    GFA_METHODS,
    INFERENCE_METHODS,
    NO_ADAPTER,
    TRAINING_METHODS,
    BenchSettings,
    InferenceSettings,
    Settings,
)
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
    batch_size: int

    @property
    def cell(self) -> str:
        return cell_name(self.shapes.name, self.scope, self.anchor)


def cell_name(shapes: str, scope: str, anchor: str) -> str:
    return f"{shapes}/{scope}/{anchor}"


def reference_anchor(anchor: str) -> str:
    """The anchor whose LoRA a cell's ratios divide by: its own, or "1" for the sub-rank-1 anchor."""
    return "1" if anchor == SUB_RANK1_LABEL else anchor


def plan(settings: Settings) -> list[list[Run]]:
    """The process groups to run, each a list of runs measured side by side (one group per reference anchor
    and batch size of each shapes and scope).

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
                for batch_size in settings.batch_sizes:
                    runs = []
                    for method in settings.methods:
                        if method in GFA_METHODS:
                            runs += [Run(shapes, scope, anchor.label, method, anchor.gfa_rank, batch_size)
                                     for anchor in members]
                        elif method in NO_ADAPTER:
                            runs.append(Run(shapes, scope, reference, method, None, batch_size))
                        elif method == REFERENCE or reference_asked_for:
                            runs.append(Run(shapes, scope, reference, method, int(reference), batch_size))
                    groups.append(runs)
    return groups


def _check(settings: Settings) -> None:
    for name, value, least in settings.lower_bounds():
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")
    _check_names("method", settings.methods,
                 INFERENCE_METHODS if isinstance(settings, InferenceSettings) else TRAINING_METHODS)
    _check_names("batch size", [str(batch_size) for batch_size in settings.batch_sizes])
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


def run_bench(settings: Settings, progress: bool = True,
              after_group: Callable[[list[dict], int, int], object] = lambda records, done, total: None,
              measured: Sequence[dict] = ()) -> list[dict]:
    """Measure every run of `plan(settings)`; one record per (cell, batch size, method), ratios included.
    After each group, `after_group(records so far with ratios, groups done, groups in all)`, e.g. to save a long
    run as it goes. `measured`: records of an earlier, stopped run of the same settings; the groups they cover
    whole are kept, not run again, so that a long run can be finished in pieces.

    Training record keys: cell, shapes, scope, anchor, method, rank, trainable, batch_size, tokens, device,
    dtype, threads, step_time_s (median), step_times_s (every timed step), cpu_time_s (median process CPU
    seconds over all threads; None on CUDA), cpu_times_s, tokens_per_s, resting_mem_mb, peak_mem_mb, step_mem_mb
    (MiB), and from `add_ratios`: reference and each ratio of `RATIOS`. Inference records: see
    `_inference_record`, and `INFERENCE_RATIOS`.
    """
    groups = plan(settings)
    earlier = {_run_key(record): record for record in measured}
    records, remaining = [], []
    for runs in groups:
        if all(_run_key(run) in earlier for run in runs):
            records += [earlier[_run_key(run)] for run in runs]
        else:
            remaining.append(runs)
    steps = sum(len(runs) for runs in remaining) * rounds(settings)
    bar = tqdm(total=steps, desc="gfa bench", unit="step", disable=not progress)
    ratios = INFERENCE_RATIOS if isinstance(settings, InferenceSettings) else RATIOS
    with tempfile.TemporaryDirectory(prefix="gfa-bench-logs-") as log_dir, bar:
        for done, runs in enumerate(remaining, len(groups) - len(remaining) + 1):
            first = runs[0]
            bar.set_postfix_str(f"{first.shapes.name} {first.scope} r={reference_anchor(first.anchor)} "
                                f"batch {first.batch_size}")
            records += measure_group(runs, settings, Path(log_dir), on_step=lambda: bar.update())
            after_group(add_ratios(records, ratios), done, len(groups))
    return add_ratios(records, ratios)


def _run_key(run: Run | dict) -> tuple[str, str, int]:
    """What identifies a run's record among those of one settings: its cell, method and batch size."""
    if isinstance(run, dict):
        return run["cell"], run["method"], run["batch_size"]
    return run.cell, run.method, run.batch_size


def rounds(settings: Settings) -> int:
    """Steps each worker runs: the warm-up, one with its memory measured, the timed ones."""
    return settings.warmup + 1 + settings.steps


def worker_spec(run: Run, settings: Settings) -> WorkerSpec:
    """The worker process that measures `run` under `settings`."""
    return WorkerSpec(run.shapes, run.scope, run.method, run.rank, run.batch_size, device=settings.device,
                      dtype=settings.dtype, threads=settings.threads, seed=settings.seed, **settings.workload())


def measure_group(runs: Sequence[Run], settings: Settings, log_dir: Path, on_step=lambda: None) -> list[dict]:
    """Run the group's workers side by side in alternating rounds; one record per run (ratios not yet added)."""
    workers = []
    try:
        for index, run in enumerate(runs):
            workers.append(WorkerHandle(worker_spec(run, settings), log_dir / f"{index}-{run.method}.log"))
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
    make_record = _inference_record if isinstance(settings, InferenceSettings) else _record
    return [make_record(run, settings, start["trainable"], steps, held)
            for run, start, steps, held in zip(runs, ready, timings, memory)]


def _common_fields(run: Run, settings: Settings, trainable: int) -> dict:
    return {
        "cell": run.cell,
        "shapes": run.shapes.name,
        "scope": run.scope,
        "anchor": run.anchor,
        "method": run.method,
        "rank": run.rank,
        "trainable": trainable,
        "batch_size": run.batch_size,
        "device": settings.device,
        "dtype": settings.dtype,
        "threads": settings.threads,
    }


def _record(run: Run, settings: BenchSettings, trainable: int, steps: list[dict], memory: dict) -> dict:
    wall = [step["wall_s"] for step in steps]
    cpu = [step["cpu_s"] for step in steps] if torch.device(settings.device).type == "cpu" else None
    step_time = statistics.median(wall)
    return {
        **_common_fields(run, settings, trainable),
        "tokens": settings.tokens,
        "step_time_s": step_time,
        "step_times_s": wall,
        "cpu_time_s": statistics.median(cpu) if cpu else None,
        "cpu_times_s": cpu,
        "tokens_per_s": settings.tokens / step_time,
        **memory,
    }


def _inference_record(run: Run, settings: InferenceSettings, trainable: int, steps: list[dict],
                      memory: dict) -> dict:
    """Keys besides the training record's first ones: prompt_len, new_tokens; prefill_s and decode_s (medians
    over the timed calls: the prompt's forward, and one decode forward, which makes batch_size tokens), with
    every timed call's value in prefill_times_s and decode_times_s, and the process CPU seconds alike
    (prefill_cpu_s, decode_cpu_s, decode_cpu_times_s; None on CUDA); prefill_tokens_per_s,
    decode_tokens_per_s; the memory of one generate call; generated (the last call's new tokens)."""
    on_cpu = torch.device(settings.device).type == "cpu"
    prefill, decode = ([step[key] for step in steps] for key in ("prefill_s", "decode_s"))
    prefill_cpu, decode_cpu = ([step[key] for step in steps] if on_cpu else None
                               for key in ("prefill_cpu_s", "decode_cpu_s"))
    return {
        **_common_fields(run, settings, trainable),
        "prompt_len": settings.prompt_len,
        "new_tokens": settings.new_tokens,
        "prefill_s": statistics.median(prefill),
        "prefill_times_s": prefill,
        "prefill_cpu_s": statistics.median(prefill_cpu) if on_cpu else None,
        "prefill_tokens_per_s": run.batch_size * settings.prompt_len / statistics.median(prefill),
        "decode_s": statistics.median(decode),
        "decode_times_s": decode,
        "decode_cpu_s": statistics.median(decode_cpu) if on_cpu else None,
        "decode_cpu_times_s": decode_cpu,
        "decode_tokens_per_s": run.batch_size / statistics.median(decode),
        **memory,
        "generated": steps[-1]["tokens"],
    }


RATIOS = {
    "time_ratio_to_lora": (REFERENCE, "step_time_s"),
    "cpu_time_ratio_to_lora": (REFERENCE, "cpu_time_s"),
    "mem_ratio_to_lora": (REFERENCE, "peak_mem_mb"),
    "step_mem_ratio_to_lora": (REFERENCE, "step_mem_mb"),
    "time_ratio_to_dora": ("dora", "step_time_s"),
}
"""Each ratio key of a training record: (the method divided by, in the cell of `reference_anchor`; the quantity)."""

INFERENCE_RATIOS = {
    "decode_ratio_to_lora": (REFERENCE, "decode_s"),
    "decode_cpu_ratio_to_lora": (REFERENCE, "decode_cpu_s"),
    "prefill_ratio_to_lora": (REFERENCE, "prefill_s"),
    "decode_ratio_to_base": ("base", "decode_s"),
    "decode_cpu_ratio_to_base": ("base", "decode_cpu_s"),
    "prefill_ratio_to_base": ("base", "prefill_s"),
    "mem_ratio_to_base": ("base", "peak_mem_mb"),
}
"""The same for an inference record: decode seconds per decode forward, prefill seconds, peak memory over LoRA
unmerged's and over the bare model's, at the same batch size."""


def add_ratios(records: Sequence[dict], ratios: dict[str, tuple[str, str]] = RATIOS) -> list[dict]:
    """The records with `reference` (the LoRA cell divided by, None without one) and every ratio in `ratios`,
    each divided by its method's record in the cell of `reference_anchor` at the same batch size (None without
    one)."""
    by_cell = {(record["method"], record["cell"], record["batch_size"]): record for record in records}
    result = []
    for record in records:
        cell = cell_name(record["shapes"], record["scope"], reference_anchor(record["anchor"]))
        values = {}
        for ratio, (method, key) in ratios.items():
            reference = by_cell.get((method, cell, record["batch_size"]))
            usable = reference is not None and record[key] is not None and reference[key]
            values[ratio] = record[key] / reference[key] if usable else None
        lora = by_cell.get((REFERENCE, cell, record["batch_size"]))
        result.append({**record, "reference": lora["cell"] if lora else None, **values})
    return result
