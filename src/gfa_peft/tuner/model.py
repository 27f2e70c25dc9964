"""`GfaModel`: the PEFT tuner that lays out all target modules and owns the global factors."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

# A module, not its names: PEFT's import can start from `targets` itself and register GFA (importing this
# module) while `targets` is still half-initialized (see gfa_peft/registration.py).
from gfa_peft import targets as target_matching
from gfa_peft.internals import is_modules_to_save_wrapper
from gfa_peft.layout import Layout, build_layout, order_modules
from gfa_peft.scatter import SliceSpec
from gfa_peft.tuner.checkpoint import check_factor_shapes, check_saved_modules
from gfa_peft.tuner.config import GfaConfig
from gfa_peft.tuner.inference_cache import ModelForward
from gfa_peft.tuner.layer import GfaFactor, GfaLayer, wrap_layer
from gfa_peft.tuner.weighted import concatenated_factors, truncated_factors
from gfa_peft.weight_ops import update_shape


class LoadWithPeftModel(ValueError, AttributeError):
    """Raised where transformers' own adapter loading meets a GFA adapter (see `_GfaTunerClass`). An
    AttributeError too, so `hasattr`, `inspect` and `help` see the class attribute as absent instead of failing."""


class _GfaTunerClass(type(BaseTuner)):
    """GfaModel's metaclass, for one message. transformers' own adapter loading (`AutoModel*.from_pretrained` of an
    adapter folder, `load_adapter`, `pipeline`) goes through PEFT's `inject_adapter_in_model`, which reads
    `uses_shared_state` on the tuner *class* and refuses a method with shared state, naming `get_peft_model`, which
    creates a new adapter and loads nothing. That class-level read is the only one in PEFT (the tuner's own code reads
    the attribute on instances, which see `uses_shared_state = True`), so it is answered with the refusal that names
    the ways that do load a GFA adapter; nothing of PEFT or transformers is changed."""

    @property
    def uses_shared_state(cls) -> bool:
        raise LoadWithPeftModel(
            "GFA adapters cannot be loaded by transformers' own adapter loading (from_pretrained of an adapter "
            "folder, load_adapter, pipeline), which injects adapters layer by layer and cannot hold GFA's factors, "
            "shared by every layer: load it with peft.PeftModel.from_pretrained(base_model, adapter_dir), or merge it "
            "into the base with `gfa merge ADAPTER --base BASE --out DIR`"
        )


class GfaModel(BaseTuner, metaclass=_GfaTunerClass):
    """Global Factorized Adaptation of a model; created through `peft.get_peft_model`.

    Attributes:
        gfa_B, gfa_A: `ModuleDict`s keyed by adapter name of `GfaFactor`s, whose `.weight` is the global
            factor B (m x r) or A (r x k): parameters `gfa_B.<adapter>.weight`, saved as `base_model.gfa_B`.
        gfa_gain: the same for the N module gains of the adapters with `module_gain` (`base_model.gfa_gain`).
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
        # PEFT keeps the trainability of the parameters already in `model`; the other adapters' factors live
        # in the tuner, outside it, so theirs is kept here (the layers' set_adapter would unfreeze the active one).
        trainability = [(parameter, parameter.requires_grad) for name, parameter in self.named_parameters()
                        if name.startswith(self.prefix)]
        self._create_factors(adapter_name, config, layout, targets, low_cpu_mem_usage)
        config.layout = layout.to_dict()
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict)
        for parameter, requires_grad in trainability:
            parameter.requires_grad_(requires_grad)
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
        layout = build_layout([(name, shapes[name]) for name in order_modules(list(targets), config.module_order)],
                              config.grid)
        try:
            layout.check_rank(config.r, "GfaConfig.r")
        except ValueError as error:
            raise ValueError(f"adapter {adapter_name!r}: {error}") from None
        if config.layout is not None:
            problem = layout.difference(Layout.from_dict(config.layout))
            if problem:
                raise ValueError(f"GFA adapter {adapter_name!r} does not fit this model: {problem}")
        saved = getattr(config, "saved_shapes", None)  # set when the config was loaded with its weights
        if saved is not None:
            where = f"GFA adapter {adapter_name!r} does not fit this model: "
            check_factor_shapes(saved, layout.m, config.r, layout.k, f"{where}its saved ", "this model's layout needs",
                                len(layout.modules) if config.module_gain else None)
            check_saved_modules(model, saved, where)
        return layout, targets

    def _create_factors(self, adapter_name, config, layout, targets, low_cpu_mem_usage):
        if "gfa_B" not in self._modules:
            self.gfa_B = nn.ModuleDict()
            self.gfa_A = nn.ModuleDict()
            self.gfa_gain = nn.ModuleDict()
            self.gfa_layouts: dict[str, Layout] = {}
            self._model_forward = ModelForward()
            self._model_forward.watch(self.model)
        reference = next(iter(targets.values())).weight
        # The base weights' dtype; PeftModel then calls `_cast_adapter_dtype`, which upcasts fp16/bf16 factors
        # to float32 unless `autocast_adapter_dtype=False`. Quantized (int8, packed 4-bit) weights get float32.
        dtype = reference.dtype if reference.dtype.is_floating_point else torch.float32
        device = torch.device("meta") if low_cpu_mem_usage else reference.device
        sigma = config.init_sigma if config.init_sigma is not None else 1.0 / math.sqrt(layout.k)
        # Drawn in float32 whatever the dtype, so a seed gives the same initial adapter for every base dtype.
        A = torch.randn(config.r, layout.k, device=device) * sigma
        B = torch.zeros(layout.m, config.r, device=device)
        if not config.init_weights:
            B.normal_(0.0, sigma)
        self.gfa_B[adapter_name] = GfaFactor(B.to(dtype), self._model_forward)
        self.gfa_A[adapter_name] = GfaFactor(A.to(dtype), self._model_forward)
        if config.module_gain:  # ones: the update starts at exactly zero either way, since B does
            self.gfa_gain[adapter_name] = GfaFactor(torch.ones(len(layout.modules), device=device, dtype=dtype),
                                                    self._model_forward)
        self.gfa_layouts[adapter_name] = layout

    def _factor_dicts(self) -> list[nn.ModuleDict]:
        """The tuner's dicts of B, A and module gains by adapter name, under the names the layers use."""
        return [getattr(self, name) for name in GfaLayer.adapter_layer_names]

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's upcast of fp16/bf16 adapter weights to float32 (which reaches only tensors inside tuner
        layers), applied to the tuner's factors too."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        if not autocast_adapter_dtype:
            return
        for factor in (factors[adapter_name] for factors in self._factor_dicts() if adapter_name in factors):
            if factor.weight.dtype in (torch.float16, torch.bfloat16):
                factor.weight.data = factor.weight.data.float()

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """`base_model.gfa_B.<adapter>.weight` is saved as `base_model.gfa_B` (and A and the gains likewise), the
        key GFA checkpoints have always had; PEFT applies the same mapping backwards when loading."""
        for factor in GfaLayer.adapter_layer_names:
            if key.endswith(f"{factor}.{adapter_name}.weight"):
                return key.removesuffix(f".{adapter_name}.weight")
        return super()._remove_adapter_name_from_key(key, adapter_name)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        layout = self.gfa_layouts[adapter_name]
        spec = SliceSpec(layout[current_key], layout.k, config.effective_scale)
        factors = (self.gfa_B[adapter_name], self.gfa_A[adapter_name])
        gain = (self.gfa_gain[adapter_name], layout.position[current_key]) if config.module_gain else None
        settings = (spec, config.dropout, config.cache_inference_update, gain)
        if isinstance(target, GfaLayer):
            target.update_layer(adapter_name, factors, *settings)
            return
        new_module = wrap_layer(target, current_key, self.gfa_B)
        new_module.update_layer(adapter_name, factors, *settings)
        self._replace_module(parent, target_name, new_module, target)

    def delete_adapter(self, adapter_name: str) -> None:
        # The factors leave the tuner first: a layer whose active adapter is deleted makes the first of the
        # tuner's remaining adapters active. If PEFT refuses (an unknown or merged adapter), they are put back.
        popped = [(factors, factors.pop(adapter_name)) for factors in self._factor_dicts() if adapter_name in factors]
        try:
            super().delete_adapter(adapter_name)  # the layers drop their references to the factors
        except Exception:
            for factors, factor in popped:
                factors[adapter_name] = factor
            raise
        del self.gfa_layouts[adapter_name]

    def _unload_and_optionally_merge(self, *args, **kwargs) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        self._model_forward.unwatch()  # the model handed back has no GFA layers left
        return model

    def clear_inference_cache(self) -> None:
        """Drop every adapted weight kept for inference (see `gfa_peft.tuner.inference_cache`); needed only
        after writing to a base weight through `.data` or a numpy view (which PyTorch does not version)
        outside an optimiser step and `load_state_dict`. Writes to the factors are always seen."""
        for module in self.model.modules():
            if isinstance(module, GfaLayer):
                module._inference_cache.clear()

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs) -> Iterator[None]:
        """Route `adapter_names=[...]` of `PeftModel.forward` / `generate` to every GFA layer (and
        `modules_to_save` wrapper): row i of the batch runs with adapter adapter_names[i] alone
        ("__base__": no adapter). Refused, as PEFT refuses it, in training mode and for unknown names."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        unknown = {name for name in adapter_names if name != "__base__"} - set(self.gfa_layouts)
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            # generate repeats every input num_beams times, each copy right after its original
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        hook = partial(_pass_adapter_names, adapter_names=list(adapter_names))
        handles = [
            module.register_forward_pre_hook(hook, with_kwargs=True)
            for module in self.model.modules()
            if isinstance(module, GfaLayer) or is_modules_to_save_wrapper(module)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
    ) -> None:
        """Add adapter `adapter_name` whose update is sum_i weights[i] * (update of adapters[i]).

        The adapters must be laid out alike (same target modules, order and shapes), so the sum is one
        GFA update on that layout. `combination_type="cat"` stores it exactly, at rank sum r_i
        (B = [w_1 s_1/s B_1, ..., w_n s_n/s B_n], A = [A_1; ...; A_n], s the first adapter's scale).
        `"svd"` stores its best approximation of rank `svd_rank` (default: the largest r_i), from QRs of
        the stacked factors and an SVD of an (sum r_i)-sized core; no m x k matrix is formed.
        The new adapter is frozen and not made active (call `set_adapter`), as in PEFT's LoRA.
        Anything wrong (unknown or existing names, a weights list of another length, different
        layouts, `modules_to_save`) raises a `ValueError` before the model is touched.
        """
        rank = self._check_weighted_adapter(adapters, weights, adapter_name, combination_type, svd_rank)
        pairs = [(self.gfa_B[name].weight.detach(), self.gfa_A[name].weight.detach()) for name in adapters]
        scale = self.peft_config[adapters[0]].effective_scale
        coefficients = [w * self.peft_config[name].effective_scale / scale for w, name in zip(weights, adapters)]
        B, A = concatenated_factors(pairs, coefficients)
        if combination_type == "svd":
            B, A = truncated_factors(B, A, rank)
        # the combined factors carry the first adapter's s exactly, whatever its scale rule would give at `rank`
        self.peft_config[adapter_name] = replace(self.peft_config[adapters[0]], r=rank, scale=scale, scale_rule="constant")
        try:
            self.inject_adapter(self.model, adapter_name)
        except Exception:
            del self.peft_config[adapter_name]
            raise
        dtype = pairs[0][0].dtype
        for factors, value in ((self.gfa_B, B), (self.gfa_A, A)):  # in the factor modules the layers hold
            factors[adapter_name].weight = nn.Parameter(value.to(dtype), requires_grad=False)

    def _check_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str, svd_rank: int | None
    ) -> int:
        """The new adapter's rank, after refusing any request `add_weighted_adapter` cannot do exactly."""
        if combination_type not in ("cat", "svd"):
            raise ValueError(f"Invalid combination_type: {combination_type} (GFA supports 'cat' and 'svd')")
        if not adapters:
            raise ValueError("add_weighted_adapter needs at least one adapter")
        if len(weights) != len(adapters):
            raise ValueError(f"add_weighted_adapter got {len(weights)} weights for {len(adapters)} adapters")
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} already exists; choose another adapter_name")
        for adapter in adapters:
            if adapter not in self.peft_config:
                raise ValueError(f"Adapter {adapter} does not exist")
            if self.peft_config[adapter].module_gain:
                raise ValueError(
                    f"add_weighted_adapter cannot combine adapter {adapter}: it has module gains, which scale each "
                    "module's slice on its own, so no one factor pair holds the weighted sum; merge the adapters "
                    "instead (merge_adapter) or convert them to LoRA (gfa convert)"
                )
            if self.peft_config[adapter].modules_to_save:
                raise ValueError(
                    f"add_weighted_adapter cannot combine adapter {adapter}: it has modules_to_save "
                    f"{sorted(self.peft_config[adapter].modules_to_save)}, which have no weighted sum"
                )
        first = self.gfa_layouts[adapters[0]]
        for adapter in adapters[1:]:
            layout = self.gfa_layouts[adapter]
            if layout != first:
                raise ValueError(
                    f"add_weighted_adapter needs adapters with one layout, but adapter {adapter} adapts "
                    f"{len(layout.modules)} modules (d={layout.d}) and adapter {adapters[0]} "
                    f"{len(first.modules)} modules (d={first.d}), or the same ones in another order or shape"
                )
        total_rank = sum(self.peft_config[adapter].r for adapter in adapters)
        if combination_type == "cat":
            if total_rank > first.max_rank():
                raise ValueError(
                    f"the concatenated rank {total_rank} exceeds min(m, k) = {first.max_rank()}: "
                    "use combination_type='svd' with svd_rank <= that"
                )
            return total_rank
        rank = svd_rank if svd_rank is not None else max(self.peft_config[adapter].r for adapter in adapters)
        if not 1 <= rank <= min(total_rank, first.max_rank()):
            raise ValueError(
                f"svd_rank={rank} is out of range: the combined update has rank at most {total_rank} and the "
                f"layout is {first.m} x {first.k}, so svd_rank must be between 1 and {min(total_rank, first.max_rank())}"
            )
        return rank


def _pass_adapter_names(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]) -> tuple[tuple, dict]:
    """Forward pre-hook adding `adapter_names` to a layer's call."""
    kwargs["adapter_names"] = adapter_names
    return args, kwargs

