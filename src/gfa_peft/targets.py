"""Which modules of a model an adapter targets, matched exactly as PEFT's `target_modules` matches them.

Keeping PEFT's semantics means one `target_modules` value selects the same modules for GFA, LoRA, DoRA,
VeRA and VB-LoRA, so their budgets are counted over the same set:

- a list or tuple of names matches a module whose full name equals an entry or ends with "." + entry;
- a single string is a regular expression that must match the full module name;
- the string "all-linear" (any case) selects every `nn.Linear` and transformers `Conv1D` except the output
  layer of a transformers model (`get_output_embeddings()`, e.g. a causal LM's `lm_head`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from gfa_peft.weight_ops import update_shape

ALL_LINEAR = "all-linear"

Matcher = Callable[[str, nn.Module], bool]


def find_targets(model: nn.Module, targets: str | Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The modules `targets` selects, as (full name, module) in the model's own order.

    Raises ValueError naming the leaf modules that exist when nothing matches.
    """
    matches = _matcher(model, targets)
    found = [(name, module) for name, module in model.named_modules() if name and matches(name, module)]
    if not found:
        raise ValueError(
            f"target modules {_describe(targets)} match no module of {type(model).__name__}; "
            f"its leaf modules are named: {', '.join(leaf_names(model))}"
        )
    return found


def target_shapes(model: nn.Module, targets: str | Sequence[str]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, update shape) of every targeted module, shapes in GFA's (out, in, ...) orientation."""
    return [(name, update_shape(module, name)) for name, module in find_targets(model, targets)]


def default_targets(model: nn.Module) -> str | list[str]:
    """PEFT's default LoRA targets for the model's type, e.g. ["q_proj", "v_proj"] for Llama and Qwen2.

    Raises ValueError when PEFT has no default for the model type.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        raise ValueError(f"PEFT has no default target modules for model type {model_type!r}; name the targets")
    return TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type]


def leaf_names(model: nn.Module) -> list[str]:
    """The distinct last name components of the model's leaf modules, in order of first appearance."""
    names = (name.rsplit(".", 1)[-1] for name, module in model.named_modules() if name and not any(module.children()))
    return list(dict.fromkeys(names))


def _matcher(model: nn.Module, targets: str | Sequence[str]) -> Matcher:
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        output_layer = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
        return lambda name, module: isinstance(module, (nn.Linear, Conv1D)) and module is not output_layer
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as error:
            raise ValueError(f"target pattern {targets!r} is not a valid regular expression: {error}") from None
        return lambda name, module: pattern.fullmatch(name) is not None
    entries = list(targets)
    if not entries:
        raise ValueError("the list of target modules is empty")
    suffixes = tuple("." + entry for entry in entries)
    return lambda name, module: name in entries or name.endswith(suffixes)


def _describe(targets: str | Sequence[str]) -> str:
    return repr(targets) if isinstance(targets, str) else repr(list(targets))
