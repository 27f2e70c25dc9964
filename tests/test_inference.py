"""Inference: the adapted weight is reused exactly and never stale; mixed-adapter batches (`adapter_names`)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

import gfa_peft
from gfa_peft import GfaConfig, GfaLayer
from gfa_peft.tuner import layer as layer_module
from test_peft_matrix import apply_deltas, dense_reference_deltas
from toy_models import CASES, MLP, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = [case.name for case in CASES]
LLAMA = CASES[2]


def make(case, **overrides):
    base = case.model()
    reference = copy.deepcopy(base)
    config = GfaConfig(**{"r": 2, "init_weights": False, "scale": 0.7, **case.config, **overrides})
    return get_peft_model(base, config).eval(), reference


def layers(model) -> list[GfaLayer]:
    return [module for module in model.modules() if isinstance(module, GfaLayer)]


def cached_entries(model) -> int:
    return sum(len(layer._inference_cache) for layer in layers(model))


@pytest.fixture
def count_formations(monkeypatch):
    """How many times an adapted weight (or update) is formed for a forward that reuses it."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    real = layer_module.effective_weight
    monkeypatch.setattr(layer_module, "effective_weight", counting)
    return calls


def uncached_output(case, model, inputs, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setenv("GFA_INFERENCE_CACHE", "0")
        return case.output(model, inputs)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reused_update_is_exact_and_formed_once(case, count_formations, monkeypatch):
    model, _ = make(case)
    inputs = case.inputs()
    with torch.no_grad():
        expected = uncached_output(case, model, inputs, monkeypatch)
        assert cached_entries(model) == 0 and not count_formations
        first = case.output(model, inputs)
        assert len(count_formations) == case.n_targets == cached_entries(model)
        second = case.output(model, inputs)
        assert len(count_formations) == case.n_targets  # nothing re-formed
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_frozen_factors_reuse_with_grad_enabled_and_input_gradients_flow():
    model, _ = make(CASES[0])
    for factor in gfa_peft.factors(model):
        factor.requires_grad_(False)
    x = torch.randn(4, 10, requires_grad=True)
    model(x=x).sum().backward()
    assert cached_entries(model) == 2
    expected_grad = x.grad.clone()
    x.grad = None
    model.clear_inference_cache()  # the next forward re-forms the weight, with gradients enabled
    model(x=x).sum().backward()
    torch.testing.assert_close(x.grad, expected_grad)


def test_no_reuse_when_factors_need_gradients_or_in_training():
    model, _ = make(LLAMA)
    model(**LLAMA.inputs())  # eval, grad enabled, trainable factors: the gradient needs the fresh update
    assert cached_entries(model) == 0
    with torch.no_grad():
        model(**LLAMA.inputs())
    assert cached_entries(model) == LLAMA.n_targets
    model.train()
    assert cached_entries(model) == 0  # train() drops the memory
    with torch.no_grad():
        model(**LLAMA.inputs())
    assert cached_entries(model) == 0


def test_switches_turn_reuse_off(monkeypatch):
    model, _ = make(LLAMA, cache_inference_update=False)
    with torch.no_grad():
        model(**LLAMA.inputs())
    assert cached_entries(model) == 0
    model, _ = make(LLAMA)
    monkeypatch.setenv("GFA_INFERENCE_CACHE", "0")
    with torch.no_grad():
        model(**LLAMA.inputs())
    assert cached_entries(model) == 0


def expect_dense(case, model, reference, inputs, adapter_name="default"):
    expected = case.output(apply_deltas(reference, dense_reference_deltas(model, adapter_name)), inputs)
    with torch.no_grad():
        torch.testing.assert_close(case.output(model, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=["mlp", "gpt2"])
def test_never_stale_after_factor_or_base_weight_changes(case):
    model, reference = make(case)
    inputs = case.inputs()
    expect_dense(case, model, reference, inputs)
    # an optimiser step
    model.train()
    case.output(model, inputs).pow(2).mean().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    model.eval()
    expect_dense(case, model, reference, inputs)
    # an in-place edit of a factor
    with torch.no_grad():
        gfa_peft.factors(model)[1].mul_(-2.0)
    expect_dense(case, model, reference, inputs)
    # loading other weights into the adapter
    other, _ = make(case, init_sigma=0.3)
    set_peft_model_state_dict(model, get_peft_model_state_dict(other))
    expect_dense(case, model, reference, inputs)
    # an in-place edit of a base weight (the reused weight is W + update)
    name = gfa_peft.layout_of(model).names[0]
    base_layer = dict(model.base_model.model.named_modules())[name].get_base_layer()
    with torch.no_grad():
        base_layer.weight.add_(0.1)
        dict(reference.named_modules())[name].weight.add_(0.1)
    expect_dense(case, model, reference, inputs)


def test_never_stale_after_merge_dtype_move_and_adapter_changes():
    case = LLAMA
    model, reference = make(case)
    inputs = case.inputs()
    expect_dense(case, model, reference, inputs)
    with torch.no_grad():
        adapted = case.output(model, inputs)
        model.merge_adapter()
        torch.testing.assert_close(case.output(model, inputs), adapted, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(case.output(model, inputs), adapted, rtol=1e-5, atol=1e-5)
    expect_dense(case, model, reference, inputs)

    model.add_adapter("other", GfaConfig(r=1, target_modules=["q_proj", "v_proj"], init_weights=False))
    model.set_adapter("other")
    expect_dense(case, model, reference, inputs, "other")
    model.set_adapter("default")
    expect_dense(case, model, reference, inputs)
    model.delete_adapter("default")
    expect_dense(case, model, reference, inputs, "other")

    model.to(torch.float64)
    with torch.no_grad():
        out = case.output(model, inputs)
    assert out.dtype == torch.float64
    expected = case.output(apply_deltas(reference.to(torch.float64), dense_reference_deltas(model, "other")), inputs)
    torch.testing.assert_close(out, expected)


def test_clear_inference_cache_after_an_unversioned_base_weight_write():
    case = CASES[0]
    model, reference = make(case)
    inputs = case.inputs()
    expect_dense(case, model, reference, inputs)
    # `.data` writes bypass PyTorch's version counter; a factor's are seen (its contents are compared), a base
    # weight's are not
    model.base_model.model.lin0.get_base_layer().weight.data.mul_(2.0)
    reference.lin0.weight.data.mul_(2.0)
    model.clear_inference_cache()
    assert cached_entries(model) == 0
    expect_dense(case, model, reference, inputs)


def test_weight_formed_under_inference_mode_is_not_reused_outside_it():
    model, _ = make(CASES[0])
    for factor in gfa_peft.factors(model):
        factor.requires_grad_(False)
    x = torch.randn(4, 10)
    with torch.inference_mode():
        expected = model(x=x)
    x.requires_grad_(True)
    out = model(x=x)  # would fail if an inference tensor were saved for backward
    out.sum().backward()
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------- mixed-adapter batches


def mlp_with_two_adapters():
    torch.manual_seed(0)
    model = get_peft_model(MLP(), GfaConfig(r=2, target_modules=["lin0", "lin1"], init_weights=False))
    model.add_adapter("other", GfaConfig(r=1, target_modules=["lin1", "lin2"], init_weights=False, scale=0.5))
    return model.eval()


def llama_with_two_adapters():
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), GfaConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False))
    model.add_adapter("other", GfaConfig(r=1, target_modules=["v_proj", "down_proj"], init_weights=False))
    return model.eval()


def run_alone(model, name, **inputs):
    """The model's output with adapter `name` alone active ("__base__": adapters disabled)."""
    if name == "__base__":
        with model.disable_adapter():
            return model(**inputs)
    model.set_adapter(name)
    return model(**inputs)


MIXED = ["other", "default", "__base__", "default", "other"]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_mixed_batch_rows_equal_separate_runs_mlp(grad):
    model = mlp_with_two_adapters()
    x = torch.randn(len(MIXED), 10)
    with torch.set_grad_enabled(grad):
        mixed = model(x=x, adapter_names=MIXED)
        alone = {name: run_alone(model, name, x=x) for name in set(MIXED)}
    assert not torch.allclose(alone["default"], alone["other"])
    for row, name in enumerate(MIXED):
        torch.testing.assert_close(mixed[row], alone[name][row], rtol=1e-6, atol=1e-6)


def test_mixed_batch_rows_equal_separate_runs_llama():
    model = llama_with_two_adapters()
    ids = torch.randint(1, 64, (len(MIXED), 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=MIXED).logits
        alone = {name: run_alone(model, name, input_ids=ids).logits for name in set(MIXED)}
    for row, name in enumerate(MIXED):
        torch.testing.assert_close(mixed[row], alone[name][row], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_beams", [1, 2], ids=["greedy", "beams"])
def test_mixed_batch_generate_rows_equal_separate_generations(num_beams):
    model = llama_with_two_adapters()
    ids = torch.randint(1, 64, (len(MIXED), 6), generator=torch.Generator().manual_seed(2))
    settings = dict(
        max_new_tokens=5, do_sample=False, num_beams=num_beams, pad_token_id=0, attention_mask=torch.ones_like(ids)
    )
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=MIXED, **settings)
        alone = {}
        for name in set(MIXED):
            if name == "__base__":
                with model.disable_adapter():
                    alone[name] = model.generate(input_ids=ids, **settings)
            else:
                model.set_adapter(name)
                alone[name] = model.generate(input_ids=ids, **settings)
    assert not torch.equal(alone["default"], alone["__base__"])
    for row, name in enumerate(MIXED):
        assert torch.equal(mixed[row], alone[name][row]), (row, name)


def test_mixed_batch_refusals_use_peft_wording():
    model = mlp_with_two_adapters()
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match=r"Length of `adapter_names` should be the same as the number of inputs, but got 2 and 3"):
        model(x=x, adapter_names=["default", "other"])
    with pytest.raises(ValueError, match="Trying to infer with non-existing adapter\\(s\\): nope"):
        model(x=x, adapter_names=["default", "nope", "__base__"])
    model.train()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode."):
        model(x=x, adapter_names=["default"] * 3)
    model.eval()
    model.merge_adapter()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters"):
        model(x=x, adapter_names=["default"] * 3)
    model.unmerge_adapter()
    assert model(x=x, adapter_names=["default"] * 3).shape == (3, 3)


def test_mixed_batch_with_modules_to_save_classifier():
    case = CASES[4]  # BERT classifier: the head is a modules_to_save wrapper
    torch.manual_seed(0)
    model = get_peft_model(case.model(), GfaConfig(r=2, init_weights=False, **case.config))
    model.add_adapter("other", GfaConfig(r=1, init_weights=False, **case.config))
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["other"].weight.mul_(-1.0)
    model.eval()
    names = ["other", "default"]
    ids = case.inputs()["input_ids"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        alone = {name: run_alone(model, name, input_ids=ids).logits for name in names}
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_reuse_on_a_quantized_base_is_exact(quantization, tmp_path, count_formations, monkeypatch):
    """A bitsandbytes base cannot take the update into its weight: each adapter's update is what is reused."""
    quantized = pytest.importorskip("test_quantized")  # skips without bitsandbytes
    model = quantized.quantized_gfa(quantized.save_quantizable_llama(tmp_path), quantization).eval()
    inputs = LLAMA.inputs()
    with torch.no_grad():
        expected = uncached_output(LLAMA, model, inputs, monkeypatch)
        first, second = LLAMA.output(model, inputs), LLAMA.output(model, inputs)
    assert len(count_formations) == cached_entries(model) == LLAMA.n_targets
    assert torch.equal(first, expected) and torch.equal(second, expected)
