"""PEFT conventions other tools rely on: layer in/out features, adapter dtype, safe-merge wording, parameter
names of the `<factor>.<adapter>.<...>` form (TRL's reference-adapter copy) with the saved keys unchanged."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import gfa_peft
from gfa_peft import GfaConfig, GfaLayer
from test_peft_matrix import apply_deltas, dense_reference_deltas
from toy_models import CASES

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = [case.name for case in CASES]
LLAMA = CASES[2]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_in_and_out_features_match_peft_lora(case):
    config = {key: value for key, value in case.config.items() if key != "task_type"}
    gfa = get_peft_model(case.model(), GfaConfig(r=1, **config))
    lora = get_peft_model(case.model(), LoraConfig(r=1, **config))
    ours = {name: (m.in_features, m.out_features) for name, m in gfa.named_modules() if isinstance(m, GfaLayer)}
    theirs = {name: (m.in_features, m.out_features) for name, m in lora.named_modules() if hasattr(m, "lora_A")}
    assert len(ours) == case.n_targets and ours == theirs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_adapter_dtype_false_keeps_the_base_dtype(dtype):
    base = LLAMA.model().to(dtype)
    reference = copy.deepcopy(base)
    model = get_peft_model(base, GfaConfig(r=2, target_modules=["q_proj"], init_weights=False), autocast_adapter_dtype=False)
    assert all(p.dtype == dtype for p in gfa_peft.factors(model))
    inputs = LLAMA.inputs()
    out = LLAMA.output(model, inputs)
    expected = LLAMA.output(apply_deltas(reference, dense_reference_deltas(model)), inputs)
    torch.testing.assert_close(out, expected, rtol=0.05, atol=0.05)
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in gfa_peft.factors(model))
    upcast = get_peft_model(LLAMA.model().to(dtype), GfaConfig(r=2, target_modules=["q_proj"]))
    assert all(p.dtype == torch.float32 for p in gfa_peft.factors(upcast))


def test_safe_merge_of_a_broken_adapter_raises_peft_wording_and_leaves_weights():
    model = get_peft_model(LLAMA.model(), GfaConfig(r=2, target_modules=["q_proj"], init_weights=False))
    with torch.no_grad():
        gfa_peft.factors(model)[0][0, 0] = float("nan")
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        model.merge_adapter(safe_merge=True)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)


def test_reference_adapter_copy_by_parameter_name_covers_both_factors():
    """TRL's DPO/KTO/GRPO re-training of a trained adapter: add a "ref" adapter with the same config and copy
    every parameter whose name contains ".default." onto the ".ref." one."""
    model = get_peft_model(LLAMA.model(), GfaConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False))
    model.add_adapter("ref", model.peft_config["default"])
    copied = []
    for name, param in model.named_parameters():
        if ".default." in name:
            model.get_parameter(name.replace(".default.", ".ref.")).data.copy_(param.data)
            copied.append(name)
    assert sorted(copied) == ["base_model.gfa_A.default.weight", "base_model.gfa_B.default.weight"]
    for ref, default in zip(gfa_peft.factors(model, "ref"), gfa_peft.factors(model, "default")):
        assert torch.equal(ref, default)
    ids = LLAMA.inputs()["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        model.set_adapter("ref")
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_checkpoint_written_with_the_original_keys_loads_exactly(tmp_path):
    """The factors are saved as `base_model.gfa_B` / `base_model.gfa_A`, as before they were named
    `gfa_B.<adapter>.weight` in the model: a file holding just those two tensors loads with no warning."""
    model = get_peft_model(LLAMA.model(), GfaConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False))
    model.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    assert set(load_file(path)) == {"base_model.gfa_B", "base_model.gfa_A"}
    B, A = (p.detach().clone() * 1.5 for p in gfa_peft.factors(model))
    save_file({"base_model.gfa_B": B.contiguous(), "base_model.gfa_A": A.contiguous()}, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(LLAMA.model(), tmp_path)
        result = loaded.load_adapter(tmp_path, adapter_name="second")
    assert not [w for w in caught if "missing" in str(w.message).lower()], [str(w.message) for w in caught]
    assert not result.missing_keys and not result.unexpected_keys
    for name in ("default", "second"):
        assert torch.equal(gfa_peft.factors(loaded, name)[0], B) and torch.equal(gfa_peft.factors(loaded, name)[1], A)


def _two_adapters() -> tuple[PeftModel, torch.Tensor]:
    torch.manual_seed(0)
    model = get_peft_model(LLAMA.model(), GfaConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False),
                           adapter_name="a")
    model.add_adapter("b", GfaConfig(r=3, target_modules=["q_proj"], init_weights=False))
    return model, LLAMA.inputs()["input_ids"]


def _factor_count(model: PeftModel, adapter: str) -> int:
    return sum(factor[adapter].weight.numel() for factor in (model.base_model.gfa_B, model.base_model.gfa_A))


def test_save_pretrained_selected_adapters_writes_and_reloads_only_those(tmp_path):
    model, ids = _two_adapters()
    model.save_pretrained(tmp_path, selected_adapters=["b"])
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_dir()) == ["b"]  # PEFT: a non-default name is a subfolder
    model.set_adapter("b")
    model.eval()
    loaded = PeftModel.from_pretrained(LLAMA.model(), tmp_path / "b", adapter_name="b").eval()
    assert set(loaded.peft_config) == {"b"}
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_model_and_layer_status_report_each_adapter():
    model, _ = _two_adapters()
    status = model.get_model_status()
    assert status.available_adapters == ["a", "b"] and status.active_adapters == ["a"]
    assert status.requires_grad == {"a": True, "b": False}
    assert status.num_adapter_layers == 4  # q and v of two layers; b adapts two of them again
    assert status.trainable_params == _factor_count(model, "a")
    layers = {layer.name: layer for layer in model.get_layer_status()}
    assert sorted(layers) == sorted(f"model.{name}" for name in gfa_peft.layout_of(model, "a").names)
    assert all(layer.available_adapters == (["a", "b"] if "q_proj" in name else ["a"]) for name, layer in layers.items())


def test_set_requires_grad_reaches_the_global_factors():
    model, _ = _two_adapters()
    model.set_requires_grad(["b"], requires_grad=True)
    model.set_requires_grad(["a"], requires_grad=False)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == {"base_model.gfa_B.b.weight", "base_model.gfa_A.b.weight"}
    assert model.get_model_status().requires_grad == {"a": False, "b": True}


def test_inference_mode_config_freezes_the_factors():
    model = get_peft_model(LLAMA.model(), GfaConfig(r=2, target_modules=["q_proj"], inference_mode=True))
    assert not any(parameter.requires_grad for parameter in model.parameters())


def test_inputs_embeds_give_the_same_output_as_input_ids():
    model, ids = _two_adapters()
    model.eval()
    embeds = model.get_input_embeddings()(ids)
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(input_ids=ids).logits)


def test_torch_compile_forward_and_backward_match_eager():
    torch.manual_seed(0)
    model = get_peft_model(LLAMA.model(), GfaConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False))
    ids = LLAMA.inputs()["input_ids"]
    eager = model(input_ids=ids, labels=ids).loss
    eager.backward()
    expected = [factor["default"].weight.grad.clone() for factor in (model.base_model.gfa_B, model.base_model.gfa_A)]
    model.zero_grad()
    compiled = torch.compile(model)(input_ids=ids, labels=ids).loss
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for factor, grad in zip((model.base_model.gfa_B, model.base_model.gfa_A), expected):
        torch.testing.assert_close(factor["default"].weight.grad, grad)


def test_deleting_the_active_adapter_makes_one_other_active_in_every_layer():
    torch.manual_seed(0)
    model = get_peft_model(LLAMA.model(), GfaConfig(r=1, target_modules=["v_proj"], init_weights=False),
                           adapter_name="a")
    model.add_adapter("b", GfaConfig(r=1, target_modules=["q_proj"], init_weights=False))
    model.add_adapter("c", GfaConfig(r=1, target_modules=["q_proj", "v_proj"], init_weights=False))
    model.set_adapter("c")
    with pytest.warns(UserWarning, match="Setting active adapter to a"):
        model.delete_adapter("c")
    assert model.active_adapters == ["a"]
    assert all(layer.active_adapters == ["a"] for layer in model.modules() if isinstance(layer, GfaLayer))
    assert set(model.base_model.gfa_B) == set(model.base_model.gfa_A) == {"a", "b"}
    model.eval()
    ids = LLAMA.inputs()["input_ids"]
    expected = apply_deltas(LLAMA.model(), dense_reference_deltas(model, "a")).eval()
    torch.testing.assert_close(model(input_ids=ids).logits, expected(input_ids=ids).logits)


def test_a_refused_delete_keeps_the_adapter():
    model, ids = _two_adapters()
    model.eval()
    before = model(input_ids=ids).logits
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['a'\] while they are merged"):
        model.delete_adapter("a")
    model.unmerge_adapter()
    assert set(model.base_model.gfa_B) == set(model.base_model.gfa_A) == {"a", "b"}
    torch.testing.assert_close(model(input_ids=ids).logits, before)
    model.delete_adapter("a")
    assert set(model.peft_config) == set(model.base_model.gfa_B) == {"b"}


@pytest.mark.parametrize("is_trainable", [False, True])
def test_adding_and_loading_adapters_keeps_trainability_as_lora_does(tmp_path, is_trainable):
    """The same calls on GFA and LoRA leave the same adapters trainable."""

    def trainable_adapters(config_class, **kwargs) -> list[set[str]]:
        folder = tmp_path / config_class.__name__
        model = get_peft_model(LLAMA.model(), config_class(target_modules=["q_proj"], **kwargs), adapter_name="a")
        model.add_adapter("b", config_class(target_modules=["q_proj"], **kwargs))
        states = [_trainable_adapters(model)]
        model.save_pretrained(folder)
        loaded = PeftModel.from_pretrained(LLAMA.model(), folder / "a", adapter_name="a")
        states.append(_trainable_adapters(loaded))
        loaded.load_adapter(str(folder / "b"), adapter_name="b", is_trainable=is_trainable)
        states.append(_trainable_adapters(loaded))
        return states

    gfa = trainable_adapters(GfaConfig, r=2)
    assert gfa == trainable_adapters(LoraConfig, r=2)
    assert gfa[-1] == ({"b"} if is_trainable else set())


def _trainable_adapters(model: PeftModel) -> set[str]:
    return {name.split(".")[-2] for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_adapter_management_calls_leave_the_state_lora_leaves():
    """A sequence of PEFT's adapter-management calls, on GFA and on LoRA: the same adapters are active,
    trainable, merged and reported, layer by layer, after every call."""

    def states(config_class, **kwargs) -> list[dict]:
        torch.manual_seed(0)
        model = get_peft_model(LLAMA.model(), config_class(target_modules=["q_proj", "v_proj"], **kwargs),
                               adapter_name="a")
        calls = [
            lambda: model.add_adapter("b", config_class(target_modules=["q_proj"], **kwargs)),
            lambda: model.set_adapter("b"),
            lambda: model.base_model.set_adapter(["a", "b"]),
            lambda: model.set_requires_grad("a", requires_grad=False),
            lambda: model.merge_adapter(),
            lambda: model.unmerge_adapter(),
            lambda: model.set_adapter("a"),
            lambda: model.delete_adapter("b"),
            lambda: model.base_model.disable_adapter_layers(),
            lambda: model.base_model.enable_adapter_layers(),
        ]
        seen = []
        for call in calls:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                call()
            status = model.get_model_status()
            seen.append({
                "active": model.active_adapters,
                "trainable": _trainable_adapters(model),
                "status": (status.active_adapters, status.merged_adapters, status.enabled, status.requires_grad,
                           status.available_adapters),
                "layers": sorted((layer.name, tuple(layer.active_adapters), tuple(layer.merged_adapters),
                                  tuple(layer.available_adapters), tuple(sorted(layer.requires_grad.items())))
                                 for layer in model.get_layer_status()),
            })
        return seen

    for step, (gfa, lora) in enumerate(zip(states(GfaConfig, r=2), states(LoraConfig, r=2))):
        assert gfa == lora, f"after call {step}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_adapter_name_makes_no_difference(case):
    """PEFT's check: the same seed gives the same adapter, and the same outputs, under any adapter name."""
    outputs = []
    for name in ("default", "other", "zzz"):
        base = case.model()
        torch.manual_seed(1)
        model = get_peft_model(base, GfaConfig(r=2, init_weights=False, **case.config), adapter_name=name).eval()
        outputs.append(case.output(model, case.inputs()))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


@pytest.mark.parametrize("first_targets", [["q_proj", "v_proj"], "all-linear"], ids=["after_q_v", "after_all_linear"])
def test_a_second_all_linear_adapter_reaches_the_modules_lora_reaches(first_targets):
    """"all-linear" for a second adapter counts the linear layers the first one already wraps, as in LoRA:
    all 14 of the tiny Llama (7 per layer, its output layer aside), and alone it gives the dense reference."""

    def reached(config_class, **kwargs) -> tuple[PeftModel, set[str]]:
        model = get_peft_model(LLAMA.model(), config_class(r=2, target_modules=first_targets, **kwargs))
        model.add_adapter("second", config_class(r=2, target_modules="all-linear", **kwargs))
        return model, {name for name, module in model.base_model.model.named_modules()
                       if "second" in getattr(module, "gfa_slice", getattr(module, "lora_A", {}))}

    torch.manual_seed(0)
    gfa, ours = reached(GfaConfig, init_weights=False)
    _, theirs = reached(LoraConfig)
    assert len(ours) == 14 and ours == theirs == set(gfa_peft.layout_of(gfa, "second").names)
    gfa.set_adapter("second")
    gfa.eval()
    ids = LLAMA.inputs()["input_ids"]
    expected = apply_deltas(LLAMA.model(), dense_reference_deltas(gfa, "second")).eval()
    with torch.no_grad():
        torch.testing.assert_close(gfa(input_ids=ids).logits, expected(input_ids=ids).logits)
