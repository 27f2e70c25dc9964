"""`GfaConfig`: the configuration of a Global Factorized Adaptation adapter."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from gfa_peft.defaults import GFA_SCALE_RULE, SCALE_RULES
from gfa_peft.layout import GRIDS, order_modules
from gfa_peft.tuner.card import write_card
from gfa_peft.tuner.checkpoint import check_adapter_file
from gfa_peft.internals import add_peft_type

GFA_PEFT_TYPE = add_peft_type("GFA")


@dataclass
class GfaConfig(PeftConfig):
    """Configuration of a [`GfaModel`]: one global factor pair shared by every target module.

    The updates of all target matrices are concatenated (in `module_order`) into one vector of
    length d, viewed as an m x k matrix (k = floor(sqrt(d)) on the default `grid`, m = ceil(d / k)) and factorised as
    B (m x r, initialised to 0) times A (r x k, initialised N(0, sigma^2)). Each module adds
    `scale` times its slice of vec(BA), reshaped to its weight. Trainable parameters: r * (m + k).
    """

    r: int = field(default=8, metadata={"help": "Rank of the global factorisation B (m x r) A (r x k); 1 <= r <= min(m, k)."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (or suffixes) to adapt, a full-match regex, or 'all-linear'. Defaults to PEFT's "
            "LoRA defaults for the model type (e.g. q_proj, v_proj for Llama)."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names (or a regex) never to adapt, even if they match target_modules."}
    )
    scale: float = field(default=1.0, metadata={"help": "The paper's s: each module adds scale * its slice of BA."})
    scale_rule: str = field(
        default=GFA_SCALE_RULE,
        metadata={
            "help": "'constant': s = scale (the paper). 'rsqrt': s = scale / sqrt(r) (rsLoRA's rule): an Adam step "
            "then moves the update by an amount that does not grow with r, so one learning rate can serve every rank."
        },
    )
    module_gain: bool = field(
        default=False,
        metadata={
            "help": "Learn one scalar gain g_i per module (N more parameters, each starting at 1): module i adds "
            "g_i * s * its slice, so each module can set the size of its update, which the shared factors alone "
            "tie together. The gained update runs as its own product beside the base layer's (unfused; "
            "`gfa bench --methods gfa,gfa-gain,lora` measures what that costs, docs/bench.md)."
        },
    )
    init_sigma: Optional[float] = field(
        default=None,
        metadata={
            "help": "Standard deviation of A's initialisation. Default 1/sqrt(k), so each row of A has unit expected "
            "norm (LoRA's Kaiming scale with k as A's fan-in) whatever the model size."
        },
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the input of the adapter path (0 disables)."})
    module_order: Union[str, int] = field(
        default="model",
        metadata={
            "help": "Concatenation order: 'model' (the model's own order), 'by_name' (all modules of one name, then "
            "the next) or an integer seed of a random permutation."
        },
    )
    grid: str = field(
        default="square",
        metadata={
            "help": "How the global matrix is shaped: 'square', k = floor(sqrt(d)) (the paper); 'aligned', k the "
            "multiple of the modules' common input width q nearest sqrt(d), so every row of every module's weight "
            "starts at a multiple of q inside a grid row and never straddles two (a module's update rows are then "
            "combinations of r*k/q vectors of length q shared by all modules). 'aligned' needs every target module "
            "to have the same input width."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "B = 0 so the adapter starts as an exact no-op. False also draws B at random (for tests)."},
    )
    cache_inference_update: bool = field(
        default=True,
        metadata={
            "help": "In eval mode, when no gradient is needed for the factors (torch.no_grad / inference_mode, or "
            "frozen factors), form each module's adapted weight once and reuse it until a factor or the base weight "
            "changes, so inference costs what the bare model costs. Memory: one extra tensor of each adapted "
            "weight's size per adapter combination run. False (or the environment variable GFA_INFERENCE_CACHE=0) "
            "re-forms the update in every forward instead."
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules besides the adapter to train and save, e.g. a classifier head."},
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt these layer indices (as in PEFT's LoRA)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list for layers_to_transform, e.g. 'layers' or 'h'."}
    )
    layout: Optional[dict] = field(
        default=None,
        metadata={
            "help": "Filled in when the adapter is created: module names, update shapes and offsets, d, m, k. "
            "A loaded adapter is checked against it, so weights never land in the wrong modules."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = GFA_PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"GfaConfig.r must be a positive integer, got {self.r!r}")
        if not _finite(self.scale) or not self.scale > 0:
            raise ValueError(f"GfaConfig.scale must be positive and finite, got {self.scale!r}")
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"GfaConfig.scale_rule must be one of {', '.join(SCALE_RULES)}, got {self.scale_rule!r}")
        if not isinstance(self.module_gain, bool):
            raise ValueError(f"GfaConfig.module_gain must be True or False, got {self.module_gain!r}")
        if self.init_sigma is not None and (not _finite(self.init_sigma) or not self.init_sigma > 0):
            raise ValueError(f"GfaConfig.init_sigma must be positive and finite (or None for 1/sqrt(k)), "
                             f"got {self.init_sigma!r}")
        if not _finite(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GfaConfig.dropout must be in [0, 1), got {self.dropout!r}")
        order_modules([], self.module_order)  # validates the value
        if self.grid not in GRIDS:
            raise ValueError(f"GfaConfig.grid must be one of {', '.join(GRIDS)}, got {self.grid!r}")
        recorded_grid = self.layout.get("grid", "square") if isinstance(self.layout, dict) else self.grid
        if recorded_grid != self.grid:
            raise ValueError(f"GfaConfig.grid is {self.grid!r} but its layout record was laid out on the "
                             f"{recorded_grid!r} grid; keep the saved config's grid, which its weights need")
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("GfaConfig.layers_pattern only applies together with layers_to_transform")

    @property
    def effective_scale(self) -> float:
        """The s each module multiplies its slice by, after `scale_rule`."""
        return self.scale / math.sqrt(self.r) if self.scale_rule == "rsqrt" else self.scale

    @classmethod
    def check_kwargs(cls, **kwargs) -> dict:
        """PEFT's hook on a saved config's fields before the config is built. A config saved before `scale_rule`
        existed trained with s = scale, the only rule then, so it loads as "constant", not as today's default
        (which would shrink its update by sqrt(r))."""
        return {"scale_rule": "constant", **super().check_kwargs(**kwargs)}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Load a saved config and, for a local adapter folder, check its weights file before any injection
        (`tuner.checkpoint.check_adapter_file`). The saved tensors' shapes are kept as `saved_shapes` (not
        saved), so the tuner checks them against the model before it injects a layer.

        A config that records no layout (hand-written, or with the field removed) is refused: without it the
        slices of B A would go to the modules in the loading model's order, scrambled in a model that registers
        its modules in another order than the one the adapter was trained on, and nothing could tell."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        directory = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if config.layout is None:
            raise ValueError(
                f"the adapter config in {directory} records no layout, so which slice of B A belongs to which "
                "module is unknown; load it with config=GfaConfig(...) into the model it was trained on, and "
                "save it again to record one"
            )
        if os.path.isdir(directory):
            config.saved_shapes = check_adapter_file(directory, config.r, config.layout, config.modules_to_save,
                                                     config.module_gain)
        return config

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Save `adapter_config.json` (PEFT's save) and the GFA section of the folder's README.md model card:
        the method, its layout (N, d, m, k, r), trainable count and how to install and load it
        (`tuner.card`). PEFT's `PeftModel.save_pretrained` saves the config last, after its own card."""
        auto_mapping = kwargs.get("auto_mapping_dict")
        super().save_pretrained(save_directory, **kwargs)
        write_card(save_directory, self, auto_mapping)


def _finite(value) -> bool:
    """A real number that is not inf or NaN (json reads 'Infinity' and 'NaN' as floats)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
