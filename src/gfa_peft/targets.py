"""Which modules of a model an adapter targets: PEFT's own `target_modules` matching, used everywhere.

GFA's tuner, the budget counts, the bench and the lens all select modules through `find_targets`, which
asks PEFT (`check_target_module_exists`, and PEFT's "all-linear" expansion) exactly as its LoRA does.
One `target_modules` value therefore selects the same modules for GFA, LoRA, DoRA, VeRA and VB-LoRA, and
their budgets are counted over the same set:

- a list of names matches a module whose full name equals an entry or ends with "." + entry;
- a single string is a regular expression that must match the full module name;
- "all-linear" (any case) selects every `nn.Linear` and transformers `Conv1D` except the model's output layer;
- `exclude_modules` (names or a regex) removes modules even when they match.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from types import SimpleNamespace

from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from gfa_peft.defaults import ALL_LINEAR
from gfa_peft.internals import expand_all_linear, is_excluded
from gfa_peft.weight_ops import update_shape


Targets = str | Sequence[str]


def find_targets(model: nn.Module, targets: Targets, exclude: Targets | None = None, *,
                 layers_to_transform: int | Sequence[int] | None = None,
                 layers_pattern: str | Sequence[str] | None = None,
                 task_type: str | None = None) -> list[tuple[str, nn.Module]]:
    """The modules `targets` selects, as (full name, module) in the model's own order.

    The keywords are `target_modules`' companions in PEFT's configs, with PEFT's meaning. Modules an adapter
    already wraps count by their base layer (the layer itself, not its adapter internals).
    Raises ValueError naming the leaf modules that exist when nothing matches, or for a malformed `targets`.
    """
    if not isinstance(targets, str) and not list(targets):
        raise ValueError("the list of target modules is empty")
    if isinstance(targets, str) and targets.lower() != ALL_LINEAR:
        try:
            re.compile(targets)
        except re.error as error:
            raise ValueError(f"target pattern {targets!r} is not a valid regular expression: {error}") from None
    config = SimpleNamespace(
        target_modules=targets if isinstance(targets, str) else set(targets),
        exclude_modules=exclude if exclude is None or isinstance(exclude, str) else set(exclude),
        layers_to_transform=layers_to_transform, layers_pattern=layers_pattern, task_type=task_type,
    )
    config = expand_all_linear(config, model)
    wrapped = tuple(name + "." for name, module in model.named_modules() if isinstance(module, BaseTunerLayer))
    found = []
    for name, module in model.named_modules():
        if not name or name.startswith(wrapped):
            continue
        match = check_target_module_exists(config, name)
        if match and not is_excluded(match):
            found.append((name, module.get_base_layer() if isinstance(module, BaseTunerLayer) else module))
    if not found:
        raise ValueError(
            f"target modules {_describe(targets)} match no module of {type(model).__name__}; "
            f"its leaf modules are named: {', '.join(leaf_names(model))}"
        )
    return found


def check_untied(modules: Sequence[tuple[str, nn.Module]]) -> None:
    """Raise ValueError when two of `modules` share one weight (tied weights, e.g. GPT-2's `wte` and `lm_head`).

    Each target gets its own update; a shared weight would receive both when merged, so the merged model would
    differ from the adapted one."""
    owners: dict[int, str] = {}
    for name, module in modules:
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        if id(weight) in owners:
            raise ValueError(f"target modules {owners[id(weight)]!r} and {name!r} share one weight (tied weights): "
                             "their two updates would add up when merged; target only one of them")
        owners[id(weight)] = name


def target_shapes(model: nn.Module, targets: Targets, exclude: Targets | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """(name, update shape) of every targeted module, shapes in GFA's (out, in, ...) orientation."""
    return [(name, update_shape(module, name)) for name, module in find_targets(model, targets, exclude)]


def default_targets(model_or_type: nn.Module | str | None) -> list[str]:
    """PEFT's default LoRA targets for a model (or a model type), e.g. ["q_proj", "v_proj"] for Llama and Qwen2.

    Raises ValueError when PEFT has no default for the model type.
    """
    model_type = model_or_type if isinstance(model_or_type, str) or model_or_type is None else \
        getattr(getattr(model_or_type, "config", None), "model_type", None)
    if model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        raise ValueError(f"PEFT has no default target modules for model type {model_type!r}; name the targets")
    return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])


def leaf_names(model: nn.Module) -> list[str]:
    """The distinct last name components of the model's leaf modules, in order of first appearance."""
    names = (name.rsplit(".", 1)[-1] for name, module in model.named_modules() if name and not any(module.children()))
    return list(dict.fromkeys(names))


def _describe(targets: Targets) -> str:
    return repr(targets) if isinstance(targets, str) else repr(sorted(targets))
