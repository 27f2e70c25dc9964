"""The methods a run can train, each placed at a budget: its PEFT config and its exact adapter-only count.

Every adapter method sits where `gfa_peft.analysis.budget.rank_anchors` places it at an anchor (or at an explicit rank),
so a sweep compares methods at the same budgets:

- `gfa`: this package's GFA, rank nearest the anchor's budget, scale 1;
- `lora`, `dora`: PEFT's LoRA and DoRA at the anchor's LoRA rank, with lora_alpha = r (scaling alpha / r = 1,
  so like GFA each adds its factor product unscaled and the tuned learning rate is the one step-size knob);
- `vera`, `vblora`: PEFT's VeRA and VB-LoRA, the shared-parameter competitors, at the knob value nearest the
  budget (VB-LoRA: R = 4, top-k = 2, vector length from `budget.vblora_vector_length`);
- `full`: full fine-tuning of the target matrices themselves (no anchor); biases and the rest stay frozen;
- `zero-shot`: the pretrained model as it is, scored without training (multiple-choice tasks only): the row every
  fine-tuned method must clear to have learnt anything.

Counts are adapter-only: a classification head, trained by every method, is never part of them (the paper's
convention).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from peft import LoraConfig, PeftConfig, VBLoRAConfig, VeraConfig

from gfa_peft.analysis.budget import (
    VBLORA_TOPK,
    Shape,
    dora_params,
    gfa_params,
    lora_params,
    ordered_layout,
    rank_anchors,
    vera_params,
)
from gfa_peft.defaults import GFA_SCALE_RULE
from gfa_peft.layout import ModuleOrder, check_grid, order_modules
from gfa_peft.training.config import flag
from gfa_peft.tuner import GfaConfig

METHODS = ("gfa", "lora", "dora", "vera", "vblora", "full", "zero-shot")
ZERO_SHOT = "zero-shot"
UNANCHORED = ("full", ZERO_SHOT)
"""Methods without a budget to place: they take no anchor or rank."""
RANKED_METHODS = ("gfa", "lora", "dora", "vera")
"""Methods whose size is a rank, so `--rank` can set it directly (VB-LoRA's knob is its bank size)."""


class PlacementError(ValueError):
    """A method that cannot be placed as asked: an anchor it cannot reach, a rank out of range."""


class UnreachableAnchor(PlacementError):
    """A budget below the method's smallest configuration (LoRA or DoRA at "1/2"): a sweep leaves the cell empty."""


@dataclass(frozen=True)
class Placement:
    """A method at one size: the anchor (or explicit rank) asked for, the knob chosen, the exact count."""

    method: str
    anchor: str | None
    """The anchor label, None for an explicit rank or for an unanchored method."""
    knobs: dict
    """The method's size settings, e.g. {"r": 3} for GFA or {"num_vectors": 24, ...} for VB-LoRA."""
    trainable: int
    """Adapter-only trainable parameters (no head)."""
    budget: int | None
    """The anchor's budget (LoRA's count at its rank), None without an anchor."""

    @property
    def label(self) -> str:
        """How the run is named: the anchor ("1_2", "4"), "r64" for an explicit rank, else the method ("full")."""
        if self.anchor is not None:
            return self.anchor.replace("/", "_")
        return f"r{self.knobs['r']}" if "r" in self.knobs else self.method


def place(method: str, named_shapes: Sequence[tuple[str, Shape]], anchor: str | None = None,
          rank: int | None = None, module_order: ModuleOrder | None = None, grid: str = "square",
          module_gain: bool = False) -> Placement:
    """Place `method` on the target modules `named_shapes` at `anchor` or at an explicit `rank`.

    Full fine-tuning and zero-shot take neither; every other method takes exactly one (VB-LoRA only an anchor).
    `module_order` (GFA only; None: the model's order), a `grid` other than "square" (GFA only; the grid
    rule, `layout.GRIDS`, which sets GFA's m and k and so its count) and `module_gain` (GFA only: N learned
    gains, added to its count; the rank stays the anchor's, placed on r (m + k)) are recorded among GFA's knobs.
    Raises PlacementError for an unknown method, a missing or extra size, an anchor the method cannot reach
    (e.g. LoRA at "1/2"), a rank out of range or a module order or grid for another method; ValueError for an
    order or grid of an unknown kind, a grid the modules cannot have, or (from `rank_anchors`) a malformed anchor.
    """
    check_grid(grid)
    gfa_knobs = {} if module_order is None else {"module_order": module_order}
    if grid != "square":
        gfa_knobs["grid"] = grid
    if module_gain:
        gfa_knobs["module_gain"] = True
    check_method_settings(method, gfa_knobs)
    if module_order is not None:
        order_modules([], module_order)  # raises ValueError naming a bad order
    placement = _place_size(method, named_shapes, anchor, rank, grid)
    gains = len(named_shapes) if module_gain else 0
    return replace(placement, knobs={**placement.knobs, **gfa_knobs}, trainable=placement.trainable + gains)


def _place_size(method: str, named_shapes: Sequence[tuple[str, Shape]], anchor: str | None, rank: int | None,
                grid: str) -> Placement:
    shapes = [shape for _, shape in named_shapes]
    if method in UNANCHORED:
        if anchor is not None or rank is not None:
            why = {"full": "trains the target matrices themselves", ZERO_SHOT: "trains nothing"}[method]
            raise PlacementError(f"{method} {why}: give no anchor or rank")
        trainable = sum(math.prod(shape) for shape in shapes) if method == "full" else 0
        return Placement(method, None, {}, trainable, None)
    if (anchor is None) == (rank is None):
        raise PlacementError(f"method {method!r} needs exactly one of an anchor or a rank")
    if rank is not None:
        return _at_rank(method, named_shapes, rank, grid)
    (placed,) = rank_anchors(named_shapes, [anchor], grid=grid)
    knobs, trainable = {
        "gfa": ({"r": placed.gfa_rank}, placed.gfa_params),
        "lora": ({"r": placed.lora_rank}, placed.lora_params),
        "dora": ({"r": placed.lora_rank}, placed.dora_params),
        "vera": ({"r": placed.vera_rank}, placed.vera_params),
        "vblora": ({"r": placed.vblora_rank, "num_vectors": placed.vblora_num_vectors,
                    "vector_length": placed.vblora_vector_length, "topk": VBLORA_TOPK}, placed.vblora_params),
    }[method]
    if trainable is None:
        smallest = {"lora": "LoRA r=1", "dora": "DoRA r=1", "vera": "VeRA r=1",
                    "vblora": f"VB-LoRA with {VBLORA_TOPK} vectors"}
        raise UnreachableAnchor(
            f"{method} cannot reach anchor {anchor} (budget {placed.budget:,} parameters): its smallest "
            f"configuration, {smallest[method]}, is larger"
        )
    return Placement(method, anchor, knobs, trainable, placed.budget)


def _at_rank(method: str, named_shapes: Sequence[tuple[str, Shape]], rank: int, grid: str) -> Placement:
    if method not in RANKED_METHODS:
        raise PlacementError(f"{method} has no rank to set: its size knob is the bank size, so give an anchor")
    if rank < 1:
        raise PlacementError(f"rank must be a positive integer, got {rank}")
    shapes = [shape for _, shape in named_shapes]
    if method == "gfa":
        layout = ordered_layout(named_shapes, grid=grid)
        try:
            layout.check_rank(rank, "GFA rank")
        except ValueError as error:
            raise PlacementError(str(error)) from None
        trainable = gfa_params(layout, rank)
    else:
        trainable = {"lora": lora_params, "dora": dora_params, "vera": vera_params}[method](shapes, rank)
    return Placement(method, None, {"r": rank}, trainable, None)


SCALED_METHODS = ("gfa", "lora", "dora")
"""Methods that add their factor product times a scale s, which `scale_rule` sets."""
AUTO_SCALE_RULE = "auto"
"""A run's scale rule when none is asked for: the method's own (`scale_rule_of`)."""


def scale_rule_of(method: str, asked: str = AUTO_SCALE_RULE) -> str:
    """The scale rule a run of `method` trains under: the one `asked`, or for "auto" the method's own: GFA's
    GfaConfig default, constant for LoRA and DoRA (lora_alpha = r) and for the methods without a scale."""
    if asked != AUTO_SCALE_RULE:
        return asked
    return GFA_SCALE_RULE if method == "gfa" else "constant"
METHOD_SETTINGS = {"scale_rule": SCALED_METHODS, "b_lr_ratio": SCALED_METHODS, "module_gain": ("gfa",),
                   "gradient_init": ("gfa",), "grid": ("gfa",), "module_order": ("gfa",)}
"""Run settings that shape some methods only (`RunConfig` fields), and the methods that have each. A single run
refuses a setting its method lacks; a sweep of several methods gives each run the settings its method has."""


def setting_owners(name: str) -> str:
    """The start of a refusal of METHOD_SETTINGS' `name`, naming the methods that have it (a run and a sweep each
    say who lacks it)."""
    return f"{flag(name)} is a setting of {', '.join(METHOD_SETTINGS[name])}"


def check_method_settings(method: str, settings: Iterable[str]) -> None:
    """Raise PlacementError for an unknown method, or for a METHOD_SETTINGS name among `settings` (those given a
    value other than their default) that `method` lacks: it would be recorded and change nothing."""
    if method not in METHODS:
        raise PlacementError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    for name in settings:
        if method not in METHOD_SETTINGS[name]:
            raise PlacementError(f"{setting_owners(name)}; {method} has none")


def peft_config(method: str, knobs: dict, targets: str | Sequence[str], task_type: str | None = None,
                zero_update: bool = True, scale_rule: str = AUTO_SCALE_RULE) -> PeftConfig:
    """The PEFT config that trains `method` at size `knobs` (a `Placement`'s) on `targets`.

    The one mapping from this package's method names to PEFT configs, used by training and by `gfa bench`.
    `zero_update=False` (GFA, LoRA and DoRA) draws every factor at random, so the adapter changes the model from
    the start: the inference bench's adapters, whose cost no shortcut for a zero update may hide.
    `scale_rule` (GFA, LoRA, DoRA): "constant" adds the factor product unscaled (s = 1: GFA's scale 1, LoRA's
    lora_alpha = r); "rsqrt" scales it by s = 1 / sqrt(r) (GFA's scale_rule="rsqrt", rsLoRA with lora_alpha = 1),
    the same rule for every method so that none gets a step-size freedom the others lack; "auto" is the method's
    own (`scale_rule_of`).
    Not defined for the unanchored methods, which use no adapter.
    """
    target_modules = targets if isinstance(targets, str) else list(targets)
    common = {"target_modules": target_modules, "task_type": task_type}
    scale_rule = scale_rule_of(method, scale_rule)
    if scale_rule != "constant" and method not in SCALED_METHODS:
        raise ValueError(f"scale rule {scale_rule!r} applies to {', '.join(SCALED_METHODS)}; {method} has no scale")
    if method == "gfa":
        return GfaConfig(r=knobs["r"], scale=1.0, scale_rule=scale_rule, module_order=knobs.get("module_order", "model"),
                         grid=knobs.get("grid", "square"), module_gain=knobs.get("module_gain", False),
                         init_weights=zero_update, **common)
    if method in ("lora", "dora"):
        rsqrt = scale_rule == "rsqrt"
        return LoraConfig(r=knobs["r"], lora_alpha=1 if rsqrt else knobs["r"], use_rslora=rsqrt,
                          use_dora=method == "dora", init_lora_weights=zero_update, **common)
    if method == "vera":
        return VeraConfig(r=knobs["r"], **common)
    if method == "vblora":
        return VBLoRAConfig(**knobs, **common)
    raise ValueError(f"method {method!r} uses no PEFT adapter")
