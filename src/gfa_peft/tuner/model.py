"""`GfaModel`: the PEFT tuner that lays out all target modules and owns the global factors."""

from __future__ import annotations

import math

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

# A module, not its names: PEFT's import can start from `targets` itself and register GFA (importing this
# module) while `targets` is still half-initialized (see gfa_peft/registration.py).
from gfa_peft import targets as target_matching
from gfa_peft.layout import Layout, build_layout, order_modules
from gfa_peft.scatter import SliceSpec
from gfa_peft.tuner.checkpoint import check_factor_shapes
from gfa_peft.tuner.config import GfaConfig
from gfa_peft.tuner.layer import GfaLayer
from gfa_peft.weight_ops import update_shape


class GfaModel(BaseTuner):
    """Global Factorized Adaptation of a model; created through `peft.get_peft_model`.

    Attributes:
        gfa_B, gfa_A: `ParameterDict`s keyed by adapter name, the global factors B (m x r), A (r x k).
        gfa_layouts: the `Layout` of each adapter (its own target modules, order, d, m, k).
    """

    prefix: str = "gfa_"
    tuner_layer_cls = GfaLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    uses_shared_state: bool = True

    @staticmethod
    def _prepare_adapter_config(peft_config: GfaConfig, model_config: dict) -> GfaConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = set(target_matching.default_targets(model_config.get("model_type")))
        return peft_config

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        # Everything that can fail is checked before the model is touched, so a bad config or a
        # saved layout that does not fit leaves the model exactly as it was.
        config = self.peft_config[adapter_name]
        layout, targets = self._plan_layout(model, config, adapter_name)
        self._create_factors(adapter_name, config, layout, targets, autocast_adapter_dtype, low_cpu_mem_usage)
        config.layout = layout.to_dict()
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict)
        adapted = {name for name, module in model.named_modules() if adapter_name in getattr(module, "gfa_slice", {})}
        if adapted != set(layout.names):
            raise RuntimeError(f"GFA adapted {sorted(adapted)} but laid out {layout.names}; please report this")

    def _plan_layout(self, model: nn.Module, config: GfaConfig, adapter_name: str) -> tuple[Layout, dict]:
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        try:
            targets = dict(target_matching.find_targets(model, config.target_modules, config.exclude_modules,
                                        layers_to_transform=config.layers_to_transform,
                                        layers_pattern=config.layers_pattern, task_type=config.task_type))
        except ValueError as error:
            raise ValueError(f"GfaConfig.target_modules: {error}") from None
        target_matching.check_untied(list(targets.items()))
        shapes = {name: update_shape(module, name) for name, module in targets.items()}
        layout = build_layout([(name, shapes[name]) for name in order_modules(list(targets), config.module_order)])
        try:
            layout.check_rank(config.r, "GfaConfig.r")
        except ValueError as error:
            raise ValueError(f"adapter {adapter_name!r}: {error}") from None
        if config.layout is not None:
            problem = layout.difference(Layout.from_dict(config.layout))
            if problem:
                raise ValueError(f"GFA adapter {adapter_name!r} does not fit this model: {problem}")
        saved = getattr(config, "saved_factor_shapes", None)  # set when the config was loaded with its weights
        if saved is not None:
            check_factor_shapes(saved, layout.m, config.r, layout.k,
                                f"GFA adapter {adapter_name!r} does not fit this model: its saved ",
                                "this model's layout needs")
        return layout, targets

    def _create_factors(self, adapter_name, config, layout, targets, autocast_adapter_dtype, low_cpu_mem_usage):
        if "gfa_B" not in self._modules:
            self.gfa_B = nn.ParameterDict()
            self.gfa_A = nn.ParameterDict()
            self.gfa_layouts: dict[str, Layout] = {}
        reference = next(iter(targets.values())).weight
        dtype = reference.dtype
        if not dtype.is_floating_point or (autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16)):
            dtype = torch.float32  # quantized (int8, packed 4-bit) weights train float32 factors
        device = torch.device("meta") if low_cpu_mem_usage else reference.device
        sigma = config.init_sigma if config.init_sigma is not None else 1.0 / math.sqrt(layout.k)
        A = torch.randn(config.r, layout.k, dtype=dtype, device=device) * sigma
        B = torch.zeros(layout.m, config.r, dtype=dtype, device=device)
        if not config.init_weights:
            B.normal_(0.0, sigma)
        self.gfa_B[adapter_name] = nn.Parameter(B)
        self.gfa_A[adapter_name] = nn.Parameter(A)
        self.gfa_layouts[adapter_name] = layout

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        layout = self.gfa_layouts[adapter_name]
        spec = SliceSpec(layout[current_key], layout.k, config.scale)
        if isinstance(target, GfaLayer):
            target.update_layer(adapter_name, spec, config.dropout)
            return
        new_module = GfaLayer(target, current_key, self.gfa_B, self.gfa_A)
        new_module.update_layer(adapter_name, spec, config.dropout)
        self._replace_module(parent, target_name, new_module, target)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        # The layers have already dropped the factors from the shared dicts (they list them in
        # adapter_layer_names); what is left to forget is the layout.
        del self.gfa_layouts[adapter_name]

