"""Model architectures for counting: built on the meta device, so no weights, no memory, no downloads.

A preset is a JSON file in `presets/` holding the shape-determining facts of a public architecture (widths,
depth, heads, vocabulary), enough to build its modules with their exact shapes. It is not a checkpoint config:
nothing here can load weights. A folder with a `config.json` (a saved or cached model) works the same way,
from its config alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and transformers load when an architecture is read, so preset_names() (help texts) is cheap
    from torch import nn
    from transformers import PretrainedConfig

PRESET_DIR = Path(__file__).with_name("presets")


def preset_names() -> list[str]:
    """The names `load_architecture` accepts besides a folder."""
    return sorted(path.stem for path in PRESET_DIR.glob("*.json"))


def architecture_config(name_or_dir: str | os.PathLike) -> PretrainedConfig:
    """The config of a folder holding `config.json` or, when no such folder exists, of a preset.

    Raises ValueError naming the presets when `name_or_dir` is neither (before transformers loads).
    """
    folder = Path(name_or_dir)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ValueError(f"model folder {str(folder)!r} has no config.json")
    elif str(name_or_dir) not in preset_names():
        raise ValueError(
            f"model {str(name_or_dir)!r} is neither a folder nor a preset; presets: {', '.join(preset_names())}"
        )
    from transformers import AutoConfig

    if folder.is_dir():
        return AutoConfig.from_pretrained(folder)
    facts = dict(_read_preset(str(name_or_dir))["config"])
    return AutoConfig.for_model(facts.pop("model_type"), **facts)


def load_architecture(name_or_dir: str | os.PathLike) -> nn.Module:
    """The model a preset name or a model folder describes, on the meta device.

    The class is the config's first `architectures` entry (e.g. `LlamaForCausalLM`, whose `lm_head` PEFT's
    "all-linear" leaves out), or the bare `AutoModel` when the config names none that transformers knows.
    """
    config = architecture_config(name_or_dir)
    import torch
    import transformers

    named = getattr(transformers, (config.architectures or [""])[0], None)
    with torch.device("meta"):
        return named(config) if named is not None else transformers.AutoModel.from_config(config)


def _read_preset(name: str) -> dict:
    return json.loads((PRESET_DIR / f"{name}.json").read_text(encoding="utf-8"))
