"""Bad configs and bad checkpoints: a clear error naming the problem, and the model left as it was."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import gfa_peft
from gfa_peft import GfaConfig, GfaLayer
from toy_models import CASES, MLP

LLAMA = CASES[2]
BERT_CLASSIFIER = next(case for case in CASES if case.name == "bert_seq_cls")


def assert_untouched(model: nn.Module, pristine: nn.Module) -> None:
    assert not any(isinstance(module, GfaLayer) for module in model.modules())
    assert not hasattr(model, "peft_config")
    assert model.state_dict().keys() == pristine.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), pristine.state_dict().values()))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(r=2.5), "r must be a positive integer"),
        (dict(scale=0.0), "scale must be positive"),
        (dict(scale=-1.0), "scale must be positive"),
        (dict(init_sigma=0.0), "init_sigma must be positive"),
        (dict(init_sigma=-0.1), "init_sigma must be positive"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(scale=float("inf")), "scale must be positive and finite"),
        (dict(scale=float("nan")), "scale must be positive and finite"),
        (dict(init_sigma=float("inf")), "init_sigma must be positive and finite"),
        (dict(dropout=float("nan")), "dropout must be in"),
        (dict(module_order="random"), "module_order must be"),
    ],
)
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GfaConfig(target_modules=["lin0"], **kwargs)


def test_rank_above_min_m_k_is_refused_and_model_untouched():
    model = MLP()
    pristine = copy.deepcopy(model)
    # lin0 alone: d = 200, k = 14, m = 15, so r <= 14
    with pytest.raises(ValueError, match="GfaConfig.r 15 is out of range.*from 1 to 14"):
        get_peft_model(model, GfaConfig(r=15, target_modules=["lin0"]))
    assert_untouched(model, pristine)
    get_peft_model(model, GfaConfig(r=14, target_modules=["lin0"]))


def test_no_matching_module_lists_existing_names():
    model = MLP()
    pristine = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"match no module.*lin0, relu, lin1, lin2"):
        get_peft_model(model, GfaConfig(target_modules=["q_proj"]))
    assert_untouched(model, pristine)


@pytest.mark.parametrize("target", ["relu", "norm"])
def test_unsupported_module_type_names_module_and_type(target):
    model = MLP()
    model.norm = nn.LayerNorm(3)
    pristine = copy.deepcopy(model)
    with pytest.raises(TypeError, match=rf"'{target}' of type torch\.nn\.modules\.\w+\.(ReLU|LayerNorm)"):
        get_peft_model(model, GfaConfig(target_modules=[target, "lin0"]))
    assert_untouched(model, pristine)


@pytest.fixture
def saved_adapter(tmp_path):
    model = get_peft_model(LLAMA.model(), GfaConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False))
    model.save_pretrained(tmp_path)
    return tmp_path


def _load_expecting(error, match, directory, base=None):
    base = base if base is not None else LLAMA.model()
    pristine = copy.deepcopy(base)
    with pytest.raises(error, match=match):
        PeftModel.from_pretrained(base, directory)
    assert_untouched(base, pristine)


def test_load_onto_model_with_other_shape_names_the_module(saved_adapter):
    base = LLAMA.model()
    base.model.layers[1].self_attn.v_proj = nn.Linear(32, 8, bias=False)
    _load_expecting(ValueError, r"'model.layers.1.self_attn.v_proj' has update shape \[16, 32\] in the saved layout but \[8, 32\]", saved_adapter, base)


def test_load_with_other_module_order_names_the_module(saved_adapter):
    config_path = os.path.join(saved_adapter, "adapter_config.json")
    config = json.load(open(config_path))
    config["module_order"] = "by_name"
    json.dump(config, open(config_path, "w"))
    _load_expecting(ValueError, r"module #1 is 'model.layers.0.self_attn.v_proj' in the saved layout but 'model.layers.1.self_attn.q_proj'", saved_adapter)


def _llama_registering_v_before_q() -> nn.Module:
    """The tiny Llama (same weights, same outputs) with each attention's v_proj registered before its q_proj."""
    model = LLAMA.model()
    for layer in model.model.layers:
        modules = layer.self_attn._modules
        layer.self_attn._modules = {"v_proj": modules["v_proj"], **{n: m for n, m in modules.items() if n != "v_proj"}}
    return model


def test_a_saved_config_without_a_layout_is_refused_before_anything_is_injected(saved_adapter):
    config_path = os.path.join(saved_adapter, "adapter_config.json")
    fields = json.load(open(config_path))
    del fields["layout"]  # a hand-written config; its slices would land on v_proj, q_proj, ... in this model
    json.dump(fields, open(config_path, "w"))
    message = r"records no layout, so which slice of B A belongs to which module is unknown; load it with config="
    _load_expecting(ValueError, message, saved_adapter, _llama_registering_v_before_q())

    model = get_peft_model(_llama_registering_v_before_q(), GfaConfig(r=2, target_modules=["q_proj"]))
    state, configs = copy.deepcopy(model.state_dict()), copy.deepcopy(model.peft_config)
    with pytest.raises(ValueError, match=message):
        model.load_adapter(str(saved_adapter), adapter_name="second")
    assert model.peft_config == configs and model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())

    # the remedy the message names: an explicit config, on the model the adapter was trained on, saved again
    del fields["peft_type"], fields["peft_version"]
    PeftModel.from_pretrained(LLAMA.model(), saved_adapter, config=GfaConfig(**fields)).save_pretrained(saved_adapter)
    _load_expecting(ValueError, r"module #0 is 'model.layers.0.self_attn.q_proj' in the saved layout but "
                                r"'model.layers.0.self_attn.v_proj'", saved_adapter, _llama_registering_v_before_q())


def test_load_onto_model_with_fewer_layers(saved_adapter):
    base = LLAMA.model()
    del base.model.layers[1]
    _load_expecting(ValueError, r"saved layout has 4 modules and the model 2", saved_adapter, base)


def test_missing_weights_file(saved_adapter):
    os.remove(os.path.join(saved_adapter, "adapter_model.safetensors"))
    _load_expecting(FileNotFoundError, "no adapter_model.safetensors", saved_adapter)


def test_truncated_weights_file(saved_adapter):
    path = os.path.join(saved_adapter, "adapter_model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-10])
    _load_expecting(ValueError, "truncated", saved_adapter)


def test_garbage_weights_file(saved_adapter):
    open(os.path.join(saved_adapter, "adapter_model.safetensors"), "wb").write(b"\x05\x00\x00\x00\x00\x00\x00\x00nope!")
    _load_expecting(ValueError, "not a safetensors file", saved_adapter)


def test_foreign_weights_file(saved_adapter, tmp_path_factory):
    from peft import LoraConfig

    lora_dir = tmp_path_factory.mktemp("lora")
    get_peft_model(LLAMA.model(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(lora_dir)
    os.replace(os.path.join(lora_dir, "adapter_model.safetensors"), os.path.join(saved_adapter, "adapter_model.safetensors"))
    _load_expecting(ValueError, "holds no GFA factors", saved_adapter)


def test_factor_shapes_disagreeing_with_config(saved_adapter):
    config_path = os.path.join(saved_adapter, "adapter_config.json")
    config = json.load(open(config_path))
    config["r"] = 3
    json.dump(config, open(config_path, "w"))
    _load_expecting(ValueError, r"gfa_B has shape \[\d+, 2\], its config promises \[\d+, 3\]", saved_adapter)


def test_failed_load_adapter_leaves_peft_model_unchanged(saved_adapter, tmp_path_factory):
    model = get_peft_model(LLAMA.model(), GfaConfig(r=2, target_modules=["q_proj"]))
    other = tmp_path_factory.mktemp("broken")
    for name in os.listdir(saved_adapter):
        data = open(os.path.join(saved_adapter, name), "rb").read()
        open(other / name, "wb").write(data[:-3] if name.endswith(".safetensors") else data)
    with pytest.raises(ValueError, match="truncated"):
        model.load_adapter(str(other), adapter_name="second")
    assert set(model.peft_config) == {"default"} and set(model.base_model.gfa_B) == {"default"}
    assert all(set(layer.gfa_slice) == {"default"} for layer in model.modules() if isinstance(layer, GfaLayer))
    assert gfa_peft.layout_of(model).names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_a_saved_config_with_an_infinite_scale_is_refused(saved_adapter):
    config_path = os.path.join(saved_adapter, "adapter_config.json")
    config = json.load(open(config_path))
    config["scale"] = float("inf")  # json writes Infinity, and reads it back as a float
    json.dump(config, open(config_path, "w"))
    _load_expecting(ValueError, "scale must be positive and finite", saved_adapter)


def _bert_classifier(num_labels: int) -> nn.Module:
    torch.manual_seed(0)
    model = BERT_CLASSIFIER.build()
    if num_labels != model.config.num_labels:  # the same encoder under a head for another label count
        model.config.num_labels = num_labels
        model.classifier = nn.Linear(model.config.hidden_size, num_labels)
    return model.eval()


@pytest.mark.parametrize("safe_serialization", [True, False])
def test_a_saved_head_for_another_label_count_is_refused_before_injection(tmp_path, safe_serialization):
    config = GfaConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    get_peft_model(_bert_classifier(3), config).save_pretrained(tmp_path, safe_serialization=safe_serialization)
    _load_expecting(ValueError, r"saved classifier\.(weight|bias) has shape \[3(, 32)?\], this model's has "
                                r"\[5(, 32)?\].*num_labels=3", tmp_path, _bert_classifier(5))
    loaded = PeftModel.from_pretrained(_bert_classifier(3), tmp_path)  # the right head still loads
    assert loaded.base_model.model.classifier.modules_to_save["default"].weight.shape == (3, 32)


def test_load_adapter_with_another_head_leaves_the_peft_model_unchanged(tmp_path):
    config = GfaConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")
    get_peft_model(_bert_classifier(3), config).save_pretrained(tmp_path)
    model = get_peft_model(_bert_classifier(5), config)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"its saved classifier\.\w+ has shape \[3.*\], this model's has \[5"):
        model.load_adapter(str(tmp_path), adapter_name="second")
    assert set(model.peft_config) == {"default"} and set(model.base_model.gfa_B) == {"default"}
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())
