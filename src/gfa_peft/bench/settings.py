"""What `gfa bench` measures and how, in a module free of torch so that `gfa bench --help` answers at once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from gfa_peft.bench.shapes import SCOPES, SHAPES, BenchShapes

BENCH_METHODS = ("gfa", "lora", "dora", "floor")
"""The paper's Table 1 methods (named as in `training.methods.METHODS`) and the no-adapter floor."""
DEFAULT_ANCHORS = ("1/2", "1", "4", "16")
DTYPE_NAMES = ("float32", "bfloat16")
"""The weights' dtypes a run can use (torch's names)."""


def available_threads() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class BenchSettings:
    """What to measure and how. The defaults are the full run; `QUICK` is the few-minute subset."""

    shapes: tuple[BenchShapes, ...] = tuple(SHAPES.values())
    scopes: tuple[str, ...] = tuple(SCOPES)
    anchors: tuple[str, ...] = DEFAULT_ANCHORS
    methods: tuple[str, ...] = BENCH_METHODS
    steps: int = 8
    warmup: int = 1
    batch_size: int = 4
    seq_len: int = 256
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = field(default_factory=available_threads)
    seed: int = 0

    @property
    def tokens(self) -> int:
        """Tokens a step."""
        return self.batch_size * self.seq_len


QUICK = BenchSettings(shapes=(SHAPES["llama-3.2-3b"],), scopes=("q+v",), anchors=("4",), steps=4, warmup=1)
"""One cell, Llama-3.2-3B shapes at q+v and the paper's Table 1 anchor (LoRA r = 4): a few minutes on 2 cores."""
