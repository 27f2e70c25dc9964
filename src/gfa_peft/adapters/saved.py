"""A saved GFA adapter folder, read without its base model: the config (with its layout) and the factors.

`gfa merge` and `gfa inspect` both start here. Everything is checked before a tensor is read: the folder,
its adapter_config.json naming a GFA adapter, and its weights file being complete and holding factors of the
shapes the config promises (`GfaConfig.from_pretrained` does the last). Bad input raises ValueError (or
FileNotFoundError for a missing weights file) with a one-line message naming the problem.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.utils import load_peft_weights

from gfa_peft.layout import Layout, ModuleSlice
from gfa_peft.scatter import SliceSpec
from gfa_peft.tuner.checkpoint import FACTOR_KEYS, GAIN_KEY
from gfa_peft.tuner.config import GfaConfig

CONFIG_FILE = "adapter_config.json"


@dataclass(frozen=True)
class SavedAdapter:
    """A GFA adapter as saved by `save_pretrained`: B (m x r) and A (r x k) in float32, the module gains (N, in
    layout order; None without `module_gain`), and the tensors saved beside them (`modules_to_save`, e.g. a
    classifier head), under their saved keys."""

    config: GfaConfig
    layout: Layout
    B: torch.Tensor
    A: torch.Tensor
    gain: torch.Tensor | None
    others: dict[str, torch.Tensor]

    def scale_of(self, piece: ModuleSlice) -> float:
        """The factor module `piece` multiplies its slice of B A by: s, times its gain g_i with module gains."""
        if self.gain is None:
            return self.config.effective_scale
        return self.config.effective_scale * float(self.gain[self.layout.position[piece.name]])

    def spec(self, piece: ModuleSlice) -> SliceSpec:
        """Where module `piece`'s update sits in the grid, with its scale (`scale_of`) as a fixed number."""
        return SliceSpec(piece, self.layout.k, self.scale_of(piece))


def read_gfa_config(adapter_dir: str | os.PathLike) -> GfaConfig:
    """The adapter's config, after checking it is a GFA adapter with a layout and a complete weights file."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise ValueError(f"adapter folder {str(adapter_dir)!r} does not exist")
    path = adapter_dir / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{adapter_dir} holds no {CONFIG_FILE}")
    try:
        peft_type = json.loads(path.read_text(encoding="utf-8")).get("peft_type")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise ValueError(f"{path} is not a JSON object ({error})") from None
    if peft_type != "GFA":
        raise ValueError(f"{adapter_dir} holds a {peft_type} adapter, not a GFA one")
    return GfaConfig.from_pretrained(str(adapter_dir))  # also checks the layout and the weights file


def load_saved_adapter(adapter_dir: str | os.PathLike) -> SavedAdapter:
    """Read and check a saved GFA adapter folder (see the module docstring for what is checked)."""
    config = read_gfa_config(adapter_dir)
    layout = Layout.from_dict(config.layout)
    weights = load_peft_weights(str(adapter_dir), device="cpu")
    missing = [key for key in FACTOR_KEYS if key not in weights]
    if missing:  # a pickled weights file, which the config check cannot read ahead
        raise ValueError(f"the adapter in {adapter_dir} holds no GFA factors {missing}")
    B, A = (weights.pop(key).float() for key in FACTOR_KEYS)
    gain = weights.pop(GAIN_KEY).float() if config.module_gain else None
    return SavedAdapter(config=config, layout=layout, B=B, A=A, gain=gain, others=weights)
