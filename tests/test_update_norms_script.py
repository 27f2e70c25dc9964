"""scripts/update_norms.py, the evidence of docs/study.md's siqa section: every module's ||Delta W_i||_F of a saved
GFA or LoRA adapter, against the update each live layer reports (`get_delta_weight`)."""

from __future__ import annotations


import pytest
import torch
from peft import LoraConfig, get_peft_model

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
