"""Default training settings of the bundled models, and each method's tuned learning rate.

A recipe is what a run uses for every setting not given explicitly. The learning rates were chosen on the
dev splits by `gfa tune` (docs/training.md gives the procedure, the trials and the command) and are read from
`default_lrs.json`. A model folder that is neither bundled model borrows the recipe of the bundled model of
its task's kind: MiniLM's for classification, SmolLM2's for multiple choice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

LEARNING_RATES_FILE = Path(__file__).with_name("default_lrs.json")


@dataclass(frozen=True)
class Recipe:
    """Training settings sized for 2 CPU cores (see docs/training.md for the timings behind them)."""

    steps: int
    batch_size: int
    max_length: int
    eval_batch_size: int
    warmup_ratio: float = 0.06
    """Linear warm-up over this fraction of the steps, then linear decay to 0."""


RECIPES: dict[str, Recipe] = {
    "minilm": Recipe(steps=250, batch_size=16, max_length=64, eval_batch_size=128),
    "smollm2": Recipe(steps=40, batch_size=8, max_length=128, eval_batch_size=16),
}
RECIPE_FOR_KIND = {"classification": "minilm", "multiple_choice": "smollm2"}


def recipe_key(model: str, task_kind: str) -> str:
    """Which recipe a run uses: the model's own if it is a bundled model, else the one for the task's kind."""
    return model if model in RECIPES else RECIPE_FOR_KIND[task_kind]


def default_learning_rate(key: str, method: str) -> float:
    """The learning rate `gfa tune` chose for `method` under recipe `key`.

    Raises ValueError when none was tuned (then the run needs an explicit learning rate).
    """
    tuned = json.loads(LEARNING_RATES_FILE.read_text(encoding="utf-8")) if LEARNING_RATES_FILE.is_file() else {}
    learning_rate = tuned.get(key, {}).get(method)
    if learning_rate is None:
        raise ValueError(f"no tuned learning rate for {method} under the {key} recipe: give one explicitly (--lr)")
    return float(learning_rate)
