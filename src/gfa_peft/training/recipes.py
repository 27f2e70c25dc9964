"""Default training settings of the bundled models, and each method's tuned learning rate.

A recipe is what a run uses for every setting not given explicitly. The learning rates were chosen on the
dev splits by `gfa tune` (docs/training.md gives the procedure, the trials and the command) and ship in
`default_lrs.json`; rates a user saves with `gfa tune --save-defaults` go to `default_lrs.json` in the cache folder
(`$GFA_CACHE`, default `~/.cache/gfa-peft`) and override the shipped ones. Nothing writes into the installed package.
A method's rate is one number for every anchor, or a map from anchor labels to rates whose "*" entry serves the
anchors it does not name and runs at an explicit rank (a method whose best rate changes with its size). A rate
tuned under a scale rule other than the constant one has its own entry, "method:rule" (`rate_entry`). A model
folder that is neither bundled model borrows the recipe of the bundled model of its task's kind: MiniLM's for
classification, SmolLM2's for multiple choice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gfa_peft.data.cache import cache_dir
from gfa_peft.io.files import make_folder, write_json_atomic

SHIPPED_LEARNING_RATES = Path(__file__).with_name("default_lrs.json")
OTHER_ANCHORS = "*"
"""The entry of a per-anchor rate map for the anchors it does not name, and for runs at an explicit rank."""
Rate = float | dict[str, float]
"""A method's tuned rate: one for every anchor, or one per anchor label (with OTHER_ANCHORS for the rest)."""


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
    "smollm2": Recipe(steps=370, batch_size=8, max_length=128, eval_batch_size=16),
}
RECIPE_FOR_KIND = {"classification": "minilm", "multiple_choice": "smollm2"}


def recipe_defaults(setting: str) -> str:
    """What each recipe sets `setting` to, for help texts: "the recipe's: minilm 250, smollm2 370"."""
    return "the recipe's: " + ", ".join(f"{key} {getattr(recipe, setting):g}" for key, recipe in RECIPES.items())


def recipe_key(model: str, task_kind: str) -> str:
    """Which recipe a run uses: the model's own if it is a bundled model, else the one for the task's kind."""
    return model if model in RECIPES else RECIPE_FOR_KIND[task_kind]


def user_learning_rates_file() -> Path:
    """Where `gfa tune --save-defaults` records the rates it chose: the user's own, beside the assets."""
    return cache_dir() / "default_lrs.json"


def learning_rates() -> dict[str, dict[str, Rate]]:
    """The tuned rate of each (recipe, method): the shipped ones, overridden by the user's saved ones."""
    rates = _read(SHIPPED_LEARNING_RATES)
    for key, methods in _read(user_learning_rates_file()).items():
        _override(rates.setdefault(key, {}), methods)
    return rates


def save_learning_rates(key: str, chosen: dict[str, Rate]) -> Path:
    """Record `chosen` (`rate_entry` -> rate) as the user's defaults under recipe `key`; returns the file written."""
    path = user_learning_rates_file()
    saved = _read(path)
    _override(saved.setdefault(key, {}), chosen)
    make_folder(path.parent)
    write_json_atomic(path, saved)
    return path


def _override(rates: dict[str, Rate], newer: dict[str, Rate]) -> None:
    """Lay `newer` over `rates`, in place: one rate replaces a method's whole entry, a per-anchor map replaces the
    anchors it names and keeps the others."""
    for method, rate in newer.items():
        older = rates.get(method)
        if isinstance(rate, dict) and older is not None:
            rate = {**(older if isinstance(older, dict) else {OTHER_ANCHORS: older}), **rate}
        rates[method] = rate


def rate_entry(method: str, scale_rule: str = "constant") -> str:
    """The entry of the rate table that serves `method` under `scale_rule`: the method's name under the constant
    rule, "method:rule" under another. A scale rule changes how far one step moves the update (s = 1/sqrt(r)
    shrinks it with the rank), so a rate tuned under one rule is no default for another."""
    return method if scale_rule == "constant" else f"{method}:{scale_rule}"


def default_learning_rate(key: str, method: str, anchor: str | None = None, scale_rule: str = "constant") -> float:
    """The learning rate `gfa tune` chose for `method` under `scale_rule` and recipe `key`, at `anchor` where it has
    one per anchor (None: a run at an explicit rank, which takes the rate for other anchors).

    Raises ValueError when none was tuned (then the run needs an explicit learning rate).
    """
    rate = entry = learning_rates().get(key, {}).get(rate_entry(method, scale_rule))
    if isinstance(entry, dict):
        rate = entry.get(anchor, entry.get(OTHER_ANCHORS))
    if rate is None:
        rule = "" if scale_rule == "constant" else f" with --scale-rule {scale_rule}"
        where = (f" at anchor {anchor}" if anchor is not None else
                 f" at an explicit rank (its per-anchor rates have no {OTHER_ANCHORS!r} entry)" if entry else "")
        raise ValueError(f"no tuned learning rate for {method}{rule}{where} under the {key} recipe: give one "
                         "explicitly (--lr; --lrs in a sweep)")
    return float(rate)


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
