"""`GfaLayer`: a target module that adds its slice of one or more global GFA updates.

The factors B and A are not parameters of the layer: they belong to the tuner (`GfaModel`),
which owns one `ParameterDict` per factor keyed by adapter name. Every layer keeps a plain,
unregistered reference to those dicts, so the checkpoint holds exactly one copy of each factor
and PEFT's `set_adapter` / `delete_adapter` / `requires_grad` handling works through the layer.
"""

from __future__ import annotations

import warnings

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from gfa_peft.scatter import SliceSpec, scattered_op, slice_of_product
from gfa_peft.weight_ops import WeightOp, op_for


class GfaLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("gfa_B", "gfa_A")
    other_param_names = ("gfa_slice", "gfa_dropout")

    def __init__(self, base_layer: nn.Module, name: str, gfa_B: nn.ParameterDict, gfa_A: nn.ParameterDict):
        super().__init__()
        self.base_layer = base_layer
        self.op: WeightOp = op_for(base_layer, name)
        # Plain attributes, not submodules: the tuner owns and saves the factors.
        object.__setattr__(self, "gfa_B", gfa_B)
        object.__setattr__(self, "gfa_A", gfa_A)
        self.gfa_slice: dict[str, SliceSpec] = {}
        self.gfa_dropout = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, spec: SliceSpec, dropout: float) -> None:
        self.gfa_slice[adapter_name] = spec
        self.gfa_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.set_adapter(self.active_adapters)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        """The shared factors are placed by the tuner; moving them per layer would fight over them."""

    @torch.no_grad()
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scale * slice of B A for this module, in GFA's (out, in, ...) orientation."""
        return slice_of_product(self.gfa_B[adapter_name], self.gfa_A[adapter_name], self.gfa_slice[adapter_name])

    def _adapters_here(self, adapter_names) -> list[str]:
        return [name for name in adapter_names if name in self.gfa_slice]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = self._adapters_here(check_adapters_to_merge(self, adapter_names))
        if adapter_names and not self.op.fusable:
            raise NotImplementedError(
                f"GFA cannot merge into the quantized layer {type(self.base_layer).__name__}: merge the adapter "
                "into the unquantized checkpoint instead (`gfa merge ADAPTER --base DIR --out DIR`)"
            )
        weight = self.op.weight()
        with torch.no_grad():
            for adapter_name in adapter_names:
                # Accumulate in float32: adding a small update to fp16/bf16 weights on CPU loses it otherwise.
                merged = weight.float() + self.get_delta_weight(adapter_name).float()
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs or infs detected when merging GFA adapter {adapter_name!r}; not merged")
                weight.copy_(merged.to(weight.dtype))
                self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.op.weight()
        with torch.no_grad():
            while self.merged_adapters:
                adapter_name = self.merged_adapters.pop()
                weight.copy_((weight.float() - self.get_delta_weight(adapter_name).float()).to(weight.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        active = [] if self.disable_adapters or self.merged else self._adapters_here(self.active_adapters)
        if not active:
            return self.base_layer(x, *args, **kwargs)
        adapters = [(self.gfa_slice[name], self.gfa_B[name], self.gfa_A[name]) for name in active]
        dropouts = [self.gfa_dropout[name] for name in active]
        if not self.op.fusable or (self.training and any(isinstance(dropout, nn.Dropout) for dropout in dropouts)):
            # A quantized weight, or dropout feeding the update a different input than the frozen weight:
            # the base layer runs as it is and each update's product is added.
            out = self.base_layer(x, *args, **kwargs)
            for adapter, dropout in zip(adapters, dropouts):
                out = out + scattered_op(dropout(x), self.op, None, [adapter]).to(out.dtype)
            return out
        return self.op.add_bias(scattered_op(x, self.op, self.op.weight(), adapters))

    def __repr__(self) -> str:
        return "gfa." + super().__repr__()
