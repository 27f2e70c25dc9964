"""The settings of one run, `RunConfig`, in a module free of torch: `gfa train --help` is built from its fields.

`training.run` checks and runs a RunConfig; every field here is one flag of `gfa train`, its help text the
field's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

from gfa_peft.defaults import GFA_SCALE_RULE
from gfa_peft.training.recipes import recipe_defaults


class RunConfigError(ValueError):
    """A run that cannot start: unknown model, task or method, unreachable anchor, leakage, bad user files."""

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable
        """True when only the budget is the problem: the method cannot reach the anchor."""


def _knob(help_text: str, default: Any = None, *, metavar: str | None = None, when_unset: str | None = None) -> Any:
    """A field and its flag: help, metavar, and what a None default means (`when_unset`, shown as the default)."""
    return field(default=default, metadata={"help": help_text, "metavar": metavar, "when_unset": when_unset})


@dataclass
class RunConfig:
    """Every setting of a run. None means: the model's recipe (`recipes.RECIPES`) or the tuned default."""

    model: str = _knob("'minilm', 'smollm2' (bundled, see `gfa assets`) or a model folder with config and tokenizer",
                       "minilm", metavar="NAME_OR_DIR")
    task: str | None = _knob("a task of `gfa assets list` (rt, trec6, arc_easy, boolq, ...), or a mixture of "
                             "multiple-choice tasks joined by '+' (arc_easy+boolq: trained on their union, scored "
                             "on each); or use --train-file", metavar="NAME",
                             when_unset="none (give --task or --train-file)")
    train_file: str | None = _knob("your own classification data: a CSV or JSONL file with text (or text_a, "
                                   "text_b) and label columns, carved into train/dev/test (docs/data.md); the run "
                                   "is recorded under the task name <format>:<folder>-<stem>, e.g. csv:reviews-train",
                                   metavar="FILE", when_unset="none")
    eval_file: str | None = _knob("with --train-file: the test examples (the training file is then carved into "
                                  "train/dev only)", metavar="FILE", when_unset="a test split carved from --train-file")
    method: str = _knob("gfa, lora, dora, vera, vblora, full (fine-tune the target matrices themselves), or "
                        "zero-shot (score the pretrained model untrained; multiple-choice tasks)", "gfa",
                        metavar="METHOD")
    anchor: str | None = _knob("the budget: '1/2' (0.3 x LoRA r=1) or a LoRA rank 1, 2, 4, 8, 16, ...; every method "
                               "is placed at it by gfa_peft.analysis.budget.rank_anchors", metavar="LABEL",
                               when_unset="none (give --anchor or --rank; full and zero-shot take neither)")
    rank: int | None = _knob("an explicit rank instead of an anchor (gfa, lora, dora, vera), e.g. a LoRA r=64 proxy",
                             metavar="R", when_unset="none (the anchor sets it)")
    module_order: str | None = _knob("GFA only: the concatenation order of the target modules: 'model' (their "
                                     "order in the model), 'by_name', or an integer seed of a random permutation",
                                     metavar="ORDER", when_unset="model")
    grid: Literal["square", "aligned"] = _knob(
        "GFA only: the shape of the global m x k matrix: square (k = floor(sqrt(d)), the paper) or aligned (k the "
        "multiple of the target modules' common input width nearest sqrt(d), so no weight row straddles two grid "
        "rows; needs every target module to have the same input width); GFA is placed at the anchor on that "
        "grid", "square", metavar="GRID")
    seed: int = _knob("seed of the head and adapter initialisation and of the data order", 0, metavar="N")
    steps: int | None = _knob("optimiser steps (exclusive with --epochs)", metavar="N",
                              when_unset=recipe_defaults("steps"))
    epochs: float | None = _knob("passes over the training split instead of a number of steps", metavar="N",
                                 when_unset="none (--steps sets the length)")
    lr: float | None = _knob("peak learning rate", metavar="RATE",
                             when_unset="the method's tuned rate for the recipe and --scale-rule (at the run's "
                             "anchor, where it has one per anchor), training/default_lrs.json or your own from `gfa "
                             "tune --save-defaults`")
    batch_size: int | None = _knob("training batch size: the global batch, which the N processes of a torchrun "
                                   "run share (N must divide it)", metavar="N",
                                   when_unset=recipe_defaults("batch_size"))
    max_length: int | None = _knob("tokens per example; longer ones lose the end of the text (classification) "
                                   "or, in training only, the start of the query (multiple choice is scored on "
                                   "whole questions)", metavar="TOKENS",
                                   when_unset=recipe_defaults("max_length"))
    targets: str | list[str] | None = _knob("target module names (PEFT target_modules semantics) or 'all-linear'",
                                            metavar="NAMES", when_unset="PEFT's LoRA default for the model type "
                                            "(query,value for BERT; q_proj,v_proj for Llama)")
    warmup_ratio: float | None = _knob("fraction of the steps spent in linear learning-rate warm-up",
                                       metavar="FRACTION", when_unset=recipe_defaults("warmup_ratio"))
    weight_decay: float = _knob("AdamW weight decay", 0.0, metavar="DECAY")
    eval_split: Literal["test", "dev"] = _knob("split to evaluate on: test, or dev (learning-rate tuning)", "test")
    eval_task: str | None = _knob("evaluate on this task's split instead (same labels; leakage is checked)",
                                  metavar="NAME", when_unset="the training task")
    max_train_examples: int | None = _knob("train on a fixed subset of this many examples (hash of their ids); "
                                           "of each task of a mixture", metavar="N", when_unset="the whole split")
    max_eval_examples: int | None = _knob("evaluate on a fixed subset of this many examples (hash of their ids); "
                                          "of each task of a mixture", metavar="N", when_unset="the whole split")
    eval_batch_size: int | None = _knob("evaluation batch size (multiple choice: questions)", metavar="N",
                                        when_unset=recipe_defaults("eval_batch_size"))
    choice_score: Literal["sum", "per-char", "per-byte"] = _knob(
        "multiple choice: a choice's score, its summed token log-likelihood (sum, lm-eval's acc) or that sum over "
        "the choice's length in characters (per-char, lm-eval's acc_norm: long answers are not penalised for their "
        "length) or UTF-8 bytes (per-byte, acc_bytes)", "sum", metavar="SCORE")
    scale_rule: Literal["auto", "constant", "rsqrt"] = _knob(
        "gfa, lora, dora: the scale s of the factor product: constant (s = 1: GFA's paper setting, LoRA's "
        "lora_alpha = r) or rsqrt (s = 1/sqrt(r): GFA's scale_rule='rsqrt', rsLoRA with lora_alpha = 1), under which "
        "an Adam step moves the update by an amount that does not grow with the rank; auto: the method's own (GFA: "
        f"GfaConfig's default, {GFA_SCALE_RULE}; LoRA, DoRA: constant)", "auto", metavar="RULE")
    b_lr_ratio: float = _knob(
        "gfa, lora, dora: the B factor's learning rate over the others' (LoRA+; 1 trains all at --lr)", 1.0,
        metavar="RATIO")
    module_gain: bool = _knob(
        "gfa only: learn one scalar gain per target module (N more parameters, counted; each starts at 1), "
        "multiplying its slice of the update (GfaConfig(module_gain=True)); GFA keeps the anchor's rank", False)
    gradient_init: int = _knob(
        "gfa only: start A from the top-r right singular vectors of the weight gradient of this many first "
        "training batches, viewed m x k (B stays 0, so the update starts at exactly 0; found by a randomized SVD "
        "through GFA's own backward, no m x k matrix formed); 0 draws A ~ N(0, 1/k)", 0, metavar="BATCHES")
    dtype: Literal["float32", "bfloat16"] = _knob(
        "compute precision: bfloat16 runs the matrix products under autocast (weights, adapter and optimiser stay "
        "float32); docs/training.md, 'Decoder speed', says when it pays", "float32", metavar="DTYPE")
    cache: str | None = _knob("asset cache folder", metavar="DIR", when_unset="$GFA_CACHE or ~/.cache/gfa-peft")


NAMED_CHOICES: dict[str, tuple[str, ...]] = {
    name: get_args(hint) for name, hint in get_type_hints(RunConfig).items() if get_origin(hint) is Literal}
"""The settings that take one of a fixed set of names, with those names (their Literal types')."""


def flag(setting: str) -> str:
    """The command-line flag of a RunConfig field (--max-train-examples for max_train_examples)."""
    return "--" + setting.replace("_", "-")


def check_named_choices(config: RunConfig) -> None:
    """Raise ValueError naming the first such setting whose value is none of its names (the flags refuse these
    already; a RunConfig built in Python does not pass through them)."""
    for name, allowed in NAMED_CHOICES.items():
        value = getattr(config, name)
        if value not in allowed:
            raise ValueError(f"{flag(name)} must be {' or '.join(map(repr, allowed))}, got {value!r}")
