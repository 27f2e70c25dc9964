"""`GfaLayer`: a target module that adds its slice of one or more global GFA updates.

The factors B and A are not parameters of the layer: they belong to the tuner (`GfaModel`),
which owns one `ModuleDict` per factor keyed by adapter name (each entry a `GfaFactor` holding
the tensor as `.weight`, so parameters are named `gfa_B.<adapter>.weight` like LoRA's
`lora_B.<adapter>.weight`). Every layer keeps plain, unregistered dicts of the factors of the adapters
that reach it, so the checkpoint holds exactly one copy of each factor, and PEFT's per-layer handling
(`set_adapter`, `delete_adapter`, `set_requires_grad`, `get_layer_status`) sees exactly those adapters.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from gfa_peft.scatter import SliceSpec, effective_weight, scattered_op, slice_of_product, weight_plus_update
from gfa_peft.tuner.inference_cache import FactorContents, InferenceCache, ModelForward, enabled_by_environment
from gfa_peft.weight_ops import Conv1DOp, LinearOp, WeightOp, op_for


class GfaFactor(nn.Module):
    """One global factor (B or A) of one adapter, held as `.weight`, with the record of its contents that the
    layers' inference reuse checks (see `gfa_peft.tuner.inference_cache`), once per pass of `model_forward`."""

    def __init__(self, tensor: torch.Tensor, model_forward: ModelForward):
        super().__init__()
        self.weight = nn.Parameter(tensor)
        self.contents = FactorContents(model_forward)


class GfaLayer(nn.Module, BaseTunerLayer):
    """A wrapped layer computing with W + sum over its active adapters of scale * slice(B A).

    In eval mode, when no gradient is needed for the factors (under `torch.no_grad()` /
    `torch.inference_mode()`, or with frozen factors), the adapted weight is formed once and reused
    until a factor or the base weight changes (see `gfa_peft.tuner.inference_cache`): this holds one
    extra tensor of the weight's size per adapter combination run. `GfaConfig.cache_inference_update`
    or `GFA_INFERENCE_CACHE=0` turn that off.
    """

    adapter_layer_names = ("gfa_B", "gfa_A", "gfa_gain")
    other_param_names = ("gfa_slice", "gfa_gain_index", "gfa_dropout", "gfa_cache_update")

    def __init__(self, base_layer: nn.Module, name: str, every_adapter: nn.ModuleDict):
        super().__init__()
        self.base_layer = base_layer
        self.op: WeightOp = op_for(base_layer, name)
        self.in_features, self.out_features = self.op.features
        # Plain attributes, not submodules: the tuner owns and saves the factors.
        object.__setattr__(self, "gfa_B", nn.ModuleDict())
        object.__setattr__(self, "gfa_A", nn.ModuleDict())
        object.__setattr__(self, "gfa_gain", nn.ModuleDict())  # only the adapters with module gains
        object.__setattr__(self, "_every_adapter", every_adapter)
        self.gfa_slice: dict[str, SliceSpec] = {}
        self.gfa_gain_index: dict[str, int] = {}
        self.gfa_dropout = nn.ModuleDict()
        self.gfa_cache_update: dict[str, bool] = {}
        self._inference_cache = InferenceCache()
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, factors: tuple[GfaFactor, GfaFactor], spec: SliceSpec, dropout: float,
                     cache_inference_update: bool, gain: tuple[GfaFactor, int] | None = None) -> None:
        """Let `adapter_name` reach this layer: its factors, where its slice sits, and, for an adapter with module
        gains, the gains and this module's index among them."""
        self.gfa_B[adapter_name], self.gfa_A[adapter_name] = factors
        if gain is not None:
            self.gfa_gain[adapter_name], self.gfa_gain_index[adapter_name] = gain
        self.gfa_slice[adapter_name] = spec
        self.gfa_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.gfa_cache_update[adapter_name] = cache_inference_update
        self._inference_cache.clear()
        self.set_adapter(self.active_adapters)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        """The shared factors are placed by the tuner; moving them per layer would fight over them."""

    def factors(self, adapter_name: str) -> tuple[nn.Parameter, nn.Parameter]:
        return self.gfa_B[adapter_name].weight, self.gfa_A[adapter_name].weight

    def gain(self, adapter_name: str) -> torch.Tensor | None:
        """This module's learned gain g_i (a 0-dim view of the adapter's gains), None without module gains."""
        if adapter_name not in self.gfa_gain:
            return None
        return self.gfa_gain[adapter_name].weight[self.gfa_gain_index[adapter_name]]

    @torch.no_grad()
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scale * slice of B A for this module (times its gain, with module gains), in GFA's (out, in, ...)
        orientation. The gain joins the scale as a number, as `gfa merge` and `gfa convert` apply it to a saved
        adapter (`SavedAdapter.scale_of`), so the live and the saved adapter give the same bits."""
        spec, gain = self.gfa_slice[adapter_name], self.gain(adapter_name)
        if gain is not None:
            spec = replace(spec, scale=spec.scale * float(gain))
        return slice_of_product(*self.factors(adapter_name), spec)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Whether PEFT's `convert_to_lora` can turn this layer's update into LoRA factors: on linear layers
        (quantized ones included). It factorizes `get_delta_weight` as the LoRA pair of a linear layer, which
        GFA's (out, in) update is; transformers' Conv1D would need the (in, out) orientation it stores (PEFT's
        FourierFT refuses it for the same reason), and LoRA keeps Conv2d and Embedding factors in other shapes."""
        return isinstance(self.op, LinearOp) and not isinstance(self.op, Conv1DOp)

    def _adapters_here(self, adapter_names) -> list[str]:
        return [name for name in adapter_names if name in self.gfa_slice]

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        self._inference_cache.clear()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._inference_cache.clear()

    def _all_available_adapter_names(self) -> list[str]:
        """Every adapter of the model, not only those reaching this layer: when the active adapter is deleted,
        PEFT makes the first of these active, and every layer must choose the same one."""
        return sorted(self._every_adapter)

    def train(self, mode: bool = True) -> GfaLayer:
        if mode:
            self._inference_cache.clear()  # training re-forms the update every step; do not hold memory for it
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        # torch's own loader leaves a sign the cache sees (a bumped version or a new tensor), but a base
        # layer's own loader may write its weight through `.data` (as some quantization libraries do).
        self._inference_cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = self._adapters_here(check_adapters_to_merge(self, adapter_names))
        if adapter_names and not self.op.fusable:
            raise NotImplementedError(
                f"GFA cannot merge into the quantized layer {type(self.base_layer).__name__}: merge the adapter "
                "into the unquantized checkpoint instead (`gfa merge ADAPTER --base DIR --out DIR`)"
            )
        self._inference_cache.clear()
        weight = self.op.weight()
        with torch.no_grad():
            for adapter_name in adapter_names:
                merged = weight_plus_update(weight, self.get_delta_weight(adapter_name))
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken")
                weight.copy_(merged)
                self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self._inference_cache.clear()
        weight = self.op.weight()
        with torch.no_grad():
            while self.merged_adapters:
                adapter_name = self.merged_adapters.pop()
                weight.copy_(weight_plus_update(weight, -self.get_delta_weight(adapter_name)))

    def _check_forward_args(self, x: torch.Tensor, *args, **kwargs) -> None:
        """PEFT's checks of a mixed-adapter batch (`adapter_names=`), with PEFT's wording."""
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            return
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self._forward_with(x, self._adapters_here(self.active_adapters), *args, **kwargs)

    def _mixed_batch_forward(self, x: torch.Tensor, *args, adapter_names: list[str], **kwargs) -> torch.Tensor:
        """Row i runs with adapter adapter_names[i] alone ("__base__", or an adapter that does not
        reach this module: the base layer)."""
        rows_of: dict[str, list[int]] = {}
        for row, name in enumerate(adapter_names):
            rows_of.setdefault(name, []).append(row)
        out = None
        for name, rows in rows_of.items():
            part = self._forward_with(x[rows], self._adapters_here([name]), *args, **kwargs)
            if out is None:
                out = part.new_empty((len(x), *part.shape[1:]))
            out[rows] = part
        return out

    def _forward_with(self, x: torch.Tensor, active: list[str], *args, **kwargs) -> torch.Tensor:
        """The layer's output with the updates of the `active` adapters added."""
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if self._may_reuse(active):
            return self._forward_reusing_update(x, active, *args, **kwargs)
        adapters = [(self.gfa_slice[name], *self.factors(name)) for name in active]
        dropouts = [self.gfa_dropout[name] for name in active]
        if not self._fuses_update(active) or (self.training and any(isinstance(d, nn.Dropout) for d in dropouts)):
            # A quantized weight, a product in 16 bits, module gains, or dropout feeding the update a different
            # input than the frozen weight: the base layer runs as it is and each update's product is added.
            out = self.base_layer(x, *args, **kwargs)
            for name, adapter, dropout in zip(active, adapters, dropouts):
                out = out + self._gained(name, scattered_op(dropout(x), self.op, None, [adapter])).to(out.dtype)
            return out
        return self.op.add_bias(scattered_op(x, self.op, self.op.weight(), adapters))

    def _gained(self, adapter_name: str, update_output: torch.Tensor) -> torch.Tensor:
        """An update's output times the module's gain (autograd then gives the gain its gradient), or as it is."""
        gain = self.gain(adapter_name)
        return update_output if gain is None else update_output * gain

    def _fuses_update(self, active: list[str]) -> bool:
        """Whether the updates are added to the weight inside the layer's op, one product for all.

        Not for a quantized weight, and not for an fp16/bf16 weight: W + s * slice rounded to 16 bits keeps
        nothing of an update below half of W's rounding step, as early in training. There the update is its
        own product, formed from the factors in their dtype, and its output is added to the base layer's with
        one rounding, as PEFT's LoRA does. (A float32 weight under 16-bit autocast stays fused: autocast rounds
        W itself to 16 bits in the product, and that rounding, shared by LoRA, is the larger error.)
        Not with module gains either: a gain multiplies its update's own product."""
        return (self.op.fusable and self.op.weight().dtype.itemsize >= 4
                and not any(name in self.gfa_gain for name in active))

    def _may_reuse(self, active: list[str]) -> bool:
        """Whether the adapted weight may be reused: in eval mode, with reuse switched on, and no gradient
        needed for the tensors it is formed from. False when it is to be formed afresh."""
        if self.training or not enabled_by_environment() or not all(self.gfa_cache_update[name] for name in active):
            return False
        sources = [self.get_base_layer().weight, *(tensor for name in active for tensor in self.factors(name))]
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in sources))

    def _forward_reusing_update(self, x: torch.Tensor, active: list[str], *args, **kwargs) -> torch.Tensor:
        """The same tensors and products as the forward above (so the same result), with the
        weight-sized tensors taken from the cache: the effective weight W + sum of the updates where
        the update fuses into the weight, otherwise each adapter's update (the input's dtype)."""

        fused = self._fuses_update(active)

        def build() -> tuple[torch.Tensor, ...]:
            if not fused:
                return tuple(effective_weight(None, [self.gfa_slice[name]], self.factors(name), x) for name in active)
            specs = [self.gfa_slice[name] for name in active]
            factors = [tensor for name in active for tensor in self.factors(name)]
            return (effective_weight(self.op.weight(), specs, factors, x),)

        factor_ids = tuple(factor.contents.current_id(factor.weight)
                           for name in active for factor in (self.gfa_B[name], self.gfa_A[name]))
        like = self.op.weight() if fused else x
        weights = self._inference_cache.get(tuple(active), self.get_base_layer().weight, factor_ids, like, build)
        if fused:
            return self.op.add_bias(self.op.forward(x, weights[0]))
        out = self.base_layer(x, *args, **kwargs)
        for name, update in zip(active, weights):
            out = out + self._gained(name, self.op.forward(x, update)).to(out.dtype)
        return out

    def __repr__(self) -> str:
        return "gfa." + super().__repr__()


class GfaLinear(GfaLayer):
    """A `GfaLayer` around a linear layer (`nn.Linear`, transformers' `Conv1D`, bitsandbytes' linears).

    Only the class name differs: PEFT recognises a linear layer that an adapter already wraps by a "Linear" in
    its wrapper's class name (LoRA's `lora.Linear`), so a later adapter's `target_modules="all-linear"` reaches
    these layers too, as it does LoRA's (see `gfa_peft.internals.expand_all_linear`)."""


def wrap_layer(base_layer: nn.Module, name: str, every_adapter: nn.ModuleDict) -> GfaLayer:
    """The GFA layer for `base_layer`: a `GfaLinear` for the layer types PEFT's "all-linear" selects."""
    layer_class = GfaLinear if isinstance(base_layer, (nn.Linear, Conv1D)) else GfaLayer
    return layer_class(base_layer, name, every_adapter)
