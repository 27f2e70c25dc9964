"""A saved GFA adapter as a standard LoRA adapter, converted by PEFT's own `convert_to_lora`, without base weights.

PEFT's converter needs of each adapted layer only its update (`get_delta_weight`, for GFA the module's slice of
B A: the factors and the layout) and the type of the layer it wraps. So the adapter's `GfaLayer`s are built
around the base model's modules on the meta device (its config.json is read, no weight is) and handed to
`convert_to_lora` in a model made of those layers alone: the LoRA factors, ranks and config are PEFT's, the
ones `convert_to_lora(PeftModel.from_pretrained(base, adapter), rank)` returns. The tensors saved beside the
factors (`modules_to_save`, e.g. a classifier head) are carried over under their saved keys, as PEFT's converter
carries a loaded model's.

Each module's LoRA pair is its update's truncated SVD (scale folded in, `lora_alpha` = r): with every singular
value of the update kept the conversion is exact, and otherwise the relative error ||dW - B A||_F / ||dW||_F is
the square root of the share of ||dW||_F^2 in the discarded singular values.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora.conversion import convert_to_lora
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file
from torch import Tensor, nn

from gfa_peft.adapters.merge import SAVED_MODULE_PREFIX
from gfa_peft.adapters.saved import CONFIG_FILE, SavedAdapter, load_saved_adapter
from gfa_peft.data.presets import load_architecture
from gfa_peft.io.files import ResultKind, output_folder
from gfa_peft.tuner.inference_cache import ModelForward
from gfa_peft.tuner.layer import GfaFactor, GfaLayer, wrap_layer

ADAPTER = "default"
ENERGY_LEVELS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999)
"""The energy thresholds `energy_curves` traces."""


def is_lora_adapter(folder: Path) -> bool:
    """Whether `folder` is a LoRA adapter as this module writes one: a LoRA config, its weights, nothing else."""
    if not {entry.name for entry in folder.iterdir()} <= {CONFIG_FILE, SAFETENSORS_WEIGHTS_NAME}:
        return False
    try:
        return json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")).get("peft_type") == "LORA"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


LORA_ADAPTER = ResultKind("LoRA adapter", is_own=is_lora_adapter, is_finished=is_lora_adapter)


@dataclass(frozen=True)
class ModuleConversion:
    """One module's update dW (p x q) and the LoRA pair B (p x rank) A (rank x q) it became."""

    name: str
    shape: tuple[int, int]
    rank: int
    energies: Tensor
    """dW's squared singular values, largest first (float64)."""
    relative_error: float
    """||dW - B A||_F / ||dW||_F, measured on the written factors (0 for a zero update)."""

    @property
    def max_rank(self) -> int:
        return min(self.shape)

    @property
    def squared_norm(self) -> float:
        return float(self.energies.sum())

    @property
    def energy_kept(self) -> float:
        """The kept singular values' share of ||dW||_F^2 (1 for a zero update)."""
        return float(self.energies[: self.rank].sum()) / self.squared_norm if self.squared_norm else 1.0

    @property
    def lora_params(self) -> int:
        return self.rank * sum(self.shape)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "rank": self.rank, "max_rank": self.max_rank,
                "energy_kept": self.energy_kept, "relative_error": self.relative_error,
                "lora_params": self.lora_params}


@dataclass(frozen=True)
class LoraConversion:
    """PEFT's LoRA config and checkpoint for a GFA adapter, and what each module lost in the conversion."""

    config: LoraConfig
    state_dict: dict[str, Tensor]
    modules: tuple[ModuleConversion, ...]
    gfa_params: int
    """r * (m + k), the GFA adapter's factor count."""
    carried: tuple[str, ...]
    """The keys of the tensors saved with the GFA adapter besides its factors (`modules_to_save`)."""

    @property
    def lora_params(self) -> int:
        """The LoRA factors' count (the carried tensors excluded, as GFA's count excludes them)."""
        return sum(module.lora_params for module in self.modules)

    @property
    def relative_error(self) -> float:
        """||dW - dW_LoRA||_F / ||dW||_F over the whole update (all modules as one vector)."""
        squared = sum(module.squared_norm for module in self.modules)
        lost = sum(module.relative_error**2 * module.squared_norm for module in self.modules)
        return (lost / squared) ** 0.5 if squared else 0.0

    def to_dict(self) -> dict:
        ranks = [module.rank for module in self.modules]
        return {
            "gfa_params": self.gfa_params,
            "lora_params": self.lora_params,
            "relative_error": self.relative_error,
            "energy_kept": 1 - self.relative_error**2,
            "rank_min": min(ranks),
            "rank_median": statistics.median(ranks),
            "rank_max": max(ranks),
            "carried": list(self.carried),
            "modules": [module.to_dict() for module in self.modules],
        }


def check_rank(rank: int | float) -> None:
    """PEFT's meaning of `rank`: an int >= 1 is one rank for every module, a float in (0, 1] an energy threshold."""
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise TypeError(f"the rank must be an int (a rank) or a float (an energy threshold), got {rank!r}")
    if isinstance(rank, int) and rank < 1:
        raise ValueError(f"the LoRA rank must be at least 1, got {rank}")
    if isinstance(rank, float) and not 0 < rank <= 1:
        raise ValueError(f"the energy threshold must be in (0, 1], got {rank}")


def convert_saved_adapter(adapter_dir: str | os.PathLike, rank: int | float,
                          base: str | os.PathLike | None = None) -> LoraConversion:
    """Convert the GFA adapter saved in `adapter_dir` to LoRA with PEFT's `convert_to_lora(model, rank)`.

    `base`: the base model's folder (or preset name), read for its module types only; default the adapter's
    `base_model_name_or_path`. Raises ValueError naming the problem (a bad rank, a folder without a GFA
    adapter, a module that is not in the base model or not a linear layer, a rank above a module's min(p, q))
    before anything is computed.
    """
    check_rank(rank)
    adapter = load_saved_adapter(adapter_dir)
    layers = gfa_layers(adapter, base if base is not None else adapter.config.base_model_name_or_path)
    if isinstance(rank, int):
        too_small = [name for name, layer in layers.items() if min(layer.op.shape) < rank]
        if too_small:
            shape = layers[too_small[0]].op.shape
            raise ValueError(f"rank {rank} exceeds the largest rank of module {too_small[0]!r} "
                             f"(shape {list(shape)}: at most {min(shape)})")
    config, state_dict = convert_to_lora(_peft_model_of(layers, adapter), rank, adapter_name=ADAPTER)
    state_dict.update(adapter.others)
    modules = tuple(
        _measured(name, layer, state_dict[f"{SAVED_MODULE_PREFIX}{name}.lora_A.weight"],
                  state_dict[f"{SAVED_MODULE_PREFIX}{name}.lora_B.weight"])
        for name, layer in layers.items()
    )
    return LoraConversion(config=config, state_dict=state_dict, modules=modules, carried=tuple(adapter.others),
                          gfa_params=adapter.layout.trainable(adapter.config.r, adapter.config.module_gain))


def gfa_layers(adapter: SavedAdapter, base: str | os.PathLike | None) -> dict[str, GfaLayer]:
    """The adapter's layers, each around its base module on the meta device, holding the saved factors."""
    if base is None:
        raise ValueError("the adapter records no base model (base_model_name_or_path): name the base model's "
                         "folder (gfa convert --base DIR)")
    architecture = load_architecture(base)
    modules = dict(architecture.named_modules())
    # A bare architecture (BertModel) lacks the prefix its task models (BertForSequenceClassification) put first.
    prefix = f"{architecture.base_model_prefix}." if getattr(architecture, "base_model_prefix", "") else ""
    unwatched = ModelForward()  # these layers run no inference: nothing ever reuses a weight here
    every_adapter = nn.ModuleDict({ADAPTER: GfaFactor(adapter.B, unwatched)})
    factors = (every_adapter[ADAPTER], GfaFactor(adapter.A, unwatched))
    layers = {}
    for piece in adapter.layout.modules:
        module = modules.get(piece.name, modules.get(piece.name.removeprefix(prefix)))
        if module is None:
            raise ValueError(f"adapter module {piece.name!r} is not a module of the base model "
                             f"({type(architecture).__name__} from {base})")
        layer = wrap_layer(module, piece.name, every_adapter)
        if layer.op.shape != piece.shape:
            raise ValueError(f"module {piece.name!r} has update shape {list(piece.shape)} in the adapter but "
                             f"{list(layer.op.shape)} in the base model")
        if not layer.supports_lora_conversion():
            raise ValueError(f"module {piece.name!r} is a {type(module).__name__}: LoRA conversion supports linear "
                             "layers only (see GfaLayer.supports_lora_conversion)")
        layer.update_layer(ADAPTER, factors, adapter.spec(piece), dropout=0.0, cache_inference_update=False)
        layers[piece.name] = layer
    return layers


def _peft_model_of(layers: dict[str, GfaLayer], adapter: SavedAdapter) -> nn.Module:
    """A model holding just `layers`, at the names PEFT's converter reads (`base_model.model.<name>`, as in a
    PeftModel; it strips that prefix from the names it records), and the adapter's config as its `peft_config`."""
    model = nn.Module()
    for name, layer in layers.items():
        *path, leaf = (SAVED_MODULE_PREFIX + name).split(".")
        parent = model
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, layer)
    model.peft_config = {ADAPTER: adapter.config}
    return model


def _measured(name: str, layer: GfaLayer, lora_A: Tensor, lora_B: Tensor) -> ModuleConversion:
    update = layer.get_delta_weight(ADAPTER).double()
    residual = torch.linalg.matrix_norm(update - lora_B.double() @ lora_A.double())
    norm = torch.linalg.matrix_norm(update)
    return ModuleConversion(
        name=name, shape=tuple(update.shape), rank=lora_A.shape[0], energies=torch.linalg.svdvals(update) ** 2,
        relative_error=float(residual / norm) if norm > 0 else 0.0,
    )


def energy_rank(energies: Tensor, threshold: float) -> int:
    """PEFT's rank for an energy threshold (`convert_to_lora` with a float): the smallest rank whose singular
    values hold at least `threshold` of the squared norm."""
    cumulative = torch.cumsum(energies, 0)
    return min(int(torch.searchsorted(cumulative, threshold * cumulative[-1])) + 1, len(energies))


def energy_curves(modules: tuple[ModuleConversion, ...]) -> dict[str, list[tuple[int, float]]]:
    """(LoRA parameters, share of the whole update's squared norm kept) for PEFT's two ways to pick ranks: one
    rank for every module (1 up to the smallest module's largest rank), and per module the smallest rank
    reaching each energy threshold of `ENERGY_LEVELS`."""
    total = sum(module.squared_norm for module in modules) or 1.0

    def point(ranks: list[int]) -> tuple[int, float]:
        kept = sum(float(module.energies[:rank].sum()) for module, rank in zip(modules, ranks))
        return sum(rank * sum(module.shape) for module, rank in zip(modules, ranks)), kept / total

    largest_shared = min(module.max_rank for module in modules)
    return {
        "fixed rank": [point([rank] * len(modules)) for rank in range(1, largest_shared + 1)],
        "energy threshold": [point([energy_rank(module.energies, level) for module in modules])
                             for level in ENERGY_LEVELS],
    }


def write_lora_adapter(conversion: LoraConversion, out: str | os.PathLike, overwrite: bool = False,
                       inputs: tuple[str | os.PathLike, ...] = ()) -> None:
    """Write the folder PEFT's `save_as_lora` writes (adapter_model.safetensors and adapter_config.json), by
    io/files.py's rule: built under a temporary name and renamed into place, never over a folder that is not
    a LoRA adapter or holds one of `inputs`; a LoRA adapter there is replaced only with `overwrite`."""
    with output_folder(out, LORA_ADAPTER, overwrite, inputs=inputs) as building:
        save_file(conversion.state_dict, building / SAFETENSORS_WEIGHTS_NAME)
        conversion.config.save_pretrained(str(building))
