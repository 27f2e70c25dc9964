"""scripts/update_norms.py, the evidence of docs/study.md's siqa section: every module's ||Delta W_i||_F of a saved
GFA or LoRA adapter, against the update each live layer reports (`get_delta_weight`)."""

from __future__ import annotations


import pytest
import torch
from peft import LoraConfig, VBLoRAConfig, VeraConfig, get_peft_model

from gfa_peft import GfaConfig
from script_modules import load_script
from toy_models import tiny_llama


@pytest.mark.parametrize("config", [
    GfaConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False, scale_rule="rsqrt"),
    LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    LoraConfig(r=4, lora_alpha=2, use_rslora=True, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
], ids=["gfa", "lora", "rslora"])
def test_norms_are_the_layers_own_updates(tmp_path, config):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), config)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = {name.removeprefix("base_model.model."): float(module.get_delta_weight("default").norm())
                    for name, module in model.named_modules() if hasattr(module, "get_delta_weight")}
    script = load_script("update_norms")
    report = script.summary(script.norms_of(tmp_path))
    assert report["modules"].keys() == expected.keys()
    for name, norm in expected.items():
        assert report["modules"][name]["norm"] == pytest.approx(norm, rel=1e-5)
    assert sum(module["energy_share"] for module in report["modules"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize("config", [
    VeraConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False),
    VBLoRAConfig(r=2, num_vectors=8, vector_length=8, target_modules=["q_proj", "v_proj"]),
    LoraConfig(r=2, lora_alpha=3, use_dora=True, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
], ids=["vera", "vblora", "dora"])
def test_other_adapters_are_measured_merged_minus_base(tmp_path, config):
    torch.manual_seed(0)
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, config)
    with torch.no_grad():  # a trained adapter's update: none of its trainable tensors left at a zero start
        for parameter in model.parameters():
            if parameter.requires_grad and not parameter.any():
                parameter.normal_()
    model.save_pretrained(tmp_path / "adapter")
    # Independent of any merge: each adapted layer's forward on the identity, less its base layer's, is Delta W^T.
    expected = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("q_proj", "v_proj")) and hasattr(module, "get_base_layer"):
                probe = torch.eye(module.get_base_layer().in_features)
                expected[name.removeprefix("base_model.model.")] = float(
                    (module(probe) - module.get_base_layer()(probe)).norm())
    script = load_script("update_norms")
    with pytest.raises(ValueError, match="give the base model's folder"):
        script.norms_of(tmp_path / "adapter")
    with torch.no_grad():
        norms = script.norms_of(tmp_path / "adapter", tmp_path / "base")
    assert norms.keys() == expected.keys() and len(norms) == 4
    for name, norm in expected.items():
        assert norms[name] == pytest.approx(norm, rel=1e-5) and norm > 0


def test_lora_read_from_its_factors_agrees_with_merged_minus_base(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    get_peft_model(base, LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj"],
                                    init_lora_weights=False)).save_pretrained(tmp_path / "adapter")
    script = load_script("update_norms")
    with torch.no_grad():
        from_factors = script.norms_of(tmp_path / "adapter")
        merged = script.merged_norms(tmp_path / "adapter", tmp_path / "base")
    assert from_factors.keys() == merged.keys()
    for name, norm in merged.items():
        assert from_factors[name] == pytest.approx(norm, rel=1e-5)


def test_the_plot_reads_bert_and_llama_layer_names_and_a_zero_update_is_refused(tmp_path):
    script = load_script("update_norms")
    norms = {f"bert.encoder.layer.{layer}.attention.self.{kind}": 1.0 + layer for layer in range(3)
             for kind in ("query", "value")}
    reports = {"bert": script.summary(norms),
               "llama": script.summary({f"model.layers.{layer}.self_attn.query": 1.0 for layer in range(2)})}
    script.plot(reports, tmp_path / "shares.png")
    assert (tmp_path / "shares.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="update is zero in every module"):
        script.summary({name: 0.0 for name in norms})
