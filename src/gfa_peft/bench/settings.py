"""What `gfa bench` measures and how, in a module free of torch so that `gfa bench --help` answers at once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from gfa_peft.bench.shapes import SCOPES, SHAPES, BenchShapes

BENCH_METHODS = ("gfa", "lora", "dora", "floor")
"""The default methods: the paper's Table 1 methods (named as in `training.methods.METHODS`) and the floor."""
TRAINING_METHODS = (*BENCH_METHODS, "gfa-gain", "wgrad")
"""Every method a training bench can measure: the defaults and, on request, GFA with a learned gain per module
(`GfaConfig.module_gain`, whose update runs as a product of its own) and the weight-gradient floor."""
INFERENCE_METHODS = ("base", "lora", "gfa", "gfa-merged")
"""The inference bench's: the bare model, LoRA and GFA unmerged, GFA merged into the base weights."""
GFA_METHODS = ("gfa", "gfa-gain", "gfa-merged")
"""Methods at the anchor's GFA rank; the floors and "base" have no adapter, the others sit at its LoRA rank."""
NO_ADAPTER = ("floor", "wgrad", "base")
DEFAULT_ANCHORS = ("1/2", "1", "4", "16")
DTYPE_NAMES = ("float32", "bfloat16")
"""The weights' dtypes a run can use (torch's names)."""


def available_threads() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class _Measurement:
    """What both benches share: which cells, how many steps, on what. Each bench sets its own defaults."""

    shapes: tuple[BenchShapes, ...] = tuple(SHAPES.values())
    scopes: tuple[str, ...] = tuple(SCOPES)
    anchors: tuple[str, ...] = DEFAULT_ANCHORS
    methods: tuple[str, ...] = BENCH_METHODS
    steps: int = 8
    warmup: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = field(default_factory=available_threads)
    seed: int = 0

    def lower_bounds(self) -> list[tuple[str, int, int]]:
        """(name, value, least allowed) of each count setting."""
        return [("steps", self.steps, 1), ("warmup", self.warmup, 1), ("threads", self.threads, 1)]


@dataclass(frozen=True)
class BenchSettings(_Measurement):
    """What to measure and how. The defaults are the full run; `QUICK` is the few-minute subset."""

    batch_size: int = 4
    seq_len: int = 256

    @property
    def tokens(self) -> int:
        """Tokens a step."""
        return self.batch_size * self.seq_len

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return (self.batch_size,)

    def workload(self) -> dict[str, Any]:
        """What a worker does each step, as `bench.worker.WorkerSpec` fields: train on `seq_len`-token sequences."""
        return {"seq_len": self.seq_len}

    def lower_bounds(self) -> list[tuple[str, int, int]]:
        return [*super().lower_bounds(), ("batch size", self.batch_size, 1), ("sequence length", self.seq_len, 2)]


QUICK = BenchSettings(shapes=(SHAPES["llama-3.2-3b"],), scopes=("q+v",), anchors=("4",), steps=4, warmup=1)
"""One cell, Llama-3.2-3B shapes at q+v and the paper's Table 1 anchor (LoRA r = 4): a few minutes on 2 cores."""


@dataclass(frozen=True)
class InferenceSettings(_Measurement):
    """What `gfa bench --inference` measures: greedy generation of `new_tokens` after a `prompt_len`-token prompt,
    at each batch size. The defaults are the full run; `QUICK_INFERENCE` is the few-minute subset."""

    anchors: tuple[str, ...] = ("4",)
    methods: tuple[str, ...] = INFERENCE_METHODS
    steps: int = 5
    batch_sizes: tuple[int, ...] = (1, 8)
    prompt_len: int = 16
    new_tokens: int = 24

    def workload(self) -> dict[str, Any]:
        """What a worker does each step, as `bench.worker.WorkerSpec` fields: generate after a prompt."""
        return {"seq_len": self.prompt_len, "task": "generate", "new_tokens": self.new_tokens}

    def lower_bounds(self) -> list[tuple[str, int, int]]:
        return [*super().lower_bounds(), ("prompt length", self.prompt_len, 1), ("new tokens", self.new_tokens, 2),
                *(("batch size", batch_size, 1) for batch_size in self.batch_sizes)]


QUICK_INFERENCE = InferenceSettings(shapes=(SHAPES["llama-3.2-3b"],), scopes=("q+v",), batch_sizes=(1,), steps=3)
"""Llama-3.2-3B shapes at q+v, batch 1, 3 timed calls: 4.5 minutes measured on 2 cores that other jobs kept busy
(its workers got 40-75% of a core)."""

Settings = BenchSettings | InferenceSettings
