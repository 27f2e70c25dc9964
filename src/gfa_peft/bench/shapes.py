"""The models `gfa bench` trains: public architectures' shapes with random weights, so nothing is downloaded.

Step time and memory depend on a model's shapes, not on its weights, so a preset's config (see `presets.py`)
with a few changes (fewer layers, a smaller vocabulary) is enough to time an adapter at a real model's widths.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gfa_peft.data.presets import architecture_config
from gfa_peft.defaults import ALL_LINEAR

if TYPE_CHECKING:  # torch and transformers load only when a model is built, so `gfa bench --help` answers at once
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

SCOPES: dict[str, str | list[str]] = {"q+v": ["q_proj", "v_proj"], "all-linear": ALL_LINEAR}
"""Each scope's PEFT `target_modules`; "all-linear" is every linear layer but the output layer (`lm_head`)."""


@dataclass(frozen=True)
class BenchShapes:
    """A causal LM's shapes: a preset's config with `changes` applied (e.g. 2 layers instead of 28)."""

    name: str
    preset: str
    changes: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def config(self) -> PretrainedConfig:
        config = architecture_config(self.preset)
        for key, value in self.changes.items():
            setattr(config, key, value)
        return config

    def build(self, device: torch.device | str = "cpu") -> PreTrainedModel:
        """The causal LM, weights drawn from torch's global generator (on the meta device: shapes only)."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device(device):
            return AutoModelForCausalLM.from_config(self.config())


SHAPES: dict[str, BenchShapes] = {
    shapes.name: shapes
    for shapes in [
        BenchShapes(
            "llama-3.2-3b",
            "llama-3.2-3b",
            {"num_hidden_layers": 2, "vocab_size": 1024},
            "Llama-3.2-3B widths (hidden 3072, intermediate 8192, 24 query / 8 key-value heads), 2 layers, "
            "vocabulary 1024",
        ),
        BenchShapes(
            "smollm2",
            "smollm2",
            {},
            "SmolLM2-135M as bundled: 30 layers, hidden 576, intermediate 1536, 9 / 3 heads, vocabulary 49152",
        ),
    ]
}
