"""Look inside a GFA adapter: its layout, its live factors and each module's update."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gfa_peft.layout import Layout
from gfa_peft.tuner.layer import GfaLayer
from gfa_peft.tuner.model import GfaModel


@dataclass(frozen=True)
class AdapterLayout(Layout):
    """A `Layout` together with the rank r of the adapter laid out on it."""

    r: int = 0


def _tuner(model: nn.Module, adapter_name: str) -> GfaModel:
    tuner = model.base_model if hasattr(model, "base_model") else model
    if not isinstance(tuner, GfaModel):
        raise TypeError(f"expected a PeftModel with a GFA adapter, got {type(model).__name__}")
    if adapter_name not in tuner.gfa_layouts:
        raise KeyError(f"no GFA adapter named {adapter_name!r}; adapters: {sorted(tuner.gfa_layouts)}")
    return tuner


def layout_of(model: nn.Module, adapter_name: str = "default") -> AdapterLayout:
    """The adapter's layout: d, m, k, r and per module its name, update shape and offset."""
    tuner = _tuner(model, adapter_name)
    layout = tuner.gfa_layouts[adapter_name]
    return AdapterLayout(layout.modules, layout.d, layout.m, layout.k, layout.grid, r=tuner.peft_config[adapter_name].r)


def factors(model: nn.Module, adapter_name: str = "default") -> tuple[nn.Parameter, nn.Parameter]:
    """The live (B, A) parameters of the adapter: B is m x r, A is r x k."""
    tuner = _tuner(model, adapter_name)
    return tuner.gfa_B[adapter_name].weight, tuner.gfa_A[adapter_name].weight


@torch.no_grad()
def delta_weights(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """{module name: scale * update}, each in its module weight's own stored shape (so W + delta is the
    adapted weight; for transformers' Conv1D that is the transpose of the layout's (out, in) shape)."""
    tuner = _tuner(model, adapter_name)
    deltas = {}
    for name, module in tuner.model.named_modules():
        if isinstance(module, GfaLayer) and adapter_name in module.gfa_slice:
            deltas[name] = module.op.stored(module.get_delta_weight(adapter_name))
    return {name: deltas[name] for name in tuner.gfa_layouts[adapter_name].names}
