"""The reused adapted weight is never stale, whatever changed the factors or the base weight: fused optimiser
steps, adapter loads that recycle a freed address, writes PyTorch does not version, a `Trainer` evaluating between
steps. Each output is compared with the same model's output with the reuse turned off."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import transformers
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers.training_args import OptimizerNames

import gfa_peft
from gfa_peft.tuner import inference_cache
from test_inference import LLAMA, cached_entries, layers, make, uncached_output
from toy_models import CASES, token_batch

pytestmark = pytest.mark.usefixtures("one_thread")
MLP_CASE = CASES[0]


def no_grad_output(case, model, inputs):
    with torch.no_grad():
        return case.output(model, inputs)


def expect_fresh(case, model, inputs, monkeypatch, stale: torch.Tensor) -> None:
    """The reused output equals the output formed afresh, and differs from `stale` (the weights did change)."""
    with torch.no_grad():
        expected = uncached_output(case, model, inputs, monkeypatch)
    reused = no_grad_output(case, model, inputs)
    assert torch.equal(reused, expected)
    assert not torch.allclose(reused, stale)


FUSED = [torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD, torch.optim.Adagrad]


def fused(optimizer_class, parameters) -> torch.optim.Optimizer:
    try:
        return optimizer_class(parameters, lr=0.1, fused=True)
    except (RuntimeError, TypeError) as error:  # no fused kernel for this optimiser on this torch / device
        pytest.skip(f"fused {optimizer_class.__name__}: {error}")


@pytest.mark.parametrize("optimizer_class", FUSED, ids=[cls.__name__ for cls in FUSED])
def test_fused_optimiser_step_on_the_factors_is_seen(optimizer_class, monkeypatch):
    """Fused optimisers write the factors without bumping their version counters; here in eval mode, so
    that no `model.train()` drops the entries in between."""
    model, _ = make(LLAMA)
    inputs = LLAMA.inputs()
    before = no_grad_output(LLAMA, model, inputs)
    optimizer = fused(optimizer_class, gfa_peft.factors(model))
    LLAMA.output(model, inputs).pow(2).mean().backward()
    optimizer.step()
    expect_fresh(LLAMA, model, inputs, monkeypatch, stale=before)


@pytest.mark.parametrize("optimizer_class", FUSED, ids=[cls.__name__ for cls in FUSED])
def test_fused_optimiser_step_on_a_base_weight_is_seen(optimizer_class, monkeypatch):
    """A base weight stepped by an optimiser has no copy to compare with: PyTorch's global step hook tells."""
    model, _ = make(MLP_CASE)
    inputs = MLP_CASE.inputs()
    base_weight = model.base_model.model.lin0.get_base_layer().weight
    before = no_grad_output(MLP_CASE, model, inputs)
    optimizer = fused(optimizer_class, [base_weight])
    base_weight.grad = torch.randn_like(base_weight)  # the step, not the gradient, is what is tested
    optimizer.step()
    expect_fresh(MLP_CASE, model, inputs, monkeypatch, stale=before)


def other_adapter_state(case, seed: int) -> dict[str, torch.Tensor]:
    other, _ = make(case, init_sigma=0.1 * (seed + 1))
    return get_peft_model_state_dict(other)


def test_adapter_loaded_twice_without_a_forward_is_seen(monkeypatch):
    """`low_cpu_mem_usage=True` assigns fresh tensors (version 0): the second load's can land where the
    tensors the entries were built from were freed (on the code before content checks: 5 of these 10 tries)."""
    model, _ = make(LLAMA)
    inputs = LLAMA.inputs()
    states = [other_adapter_state(LLAMA, seed) for seed in range(4)]

    def load(state):
        set_peft_model_state_dict(model, {k: v.clone() for k, v in state.items()}, low_cpu_mem_usage=True)

    for attempt in range(10):  # the allocator need not recycle the addresses every time
        load(states[attempt % 2])
        before = no_grad_output(LLAMA, model, inputs)
        load(states[2])
        load(states[3])
        expect_fresh(LLAMA, model, inputs, monkeypatch, stale=before)


def write_through_numpy(factor: torch.Tensor) -> None:
    factor.detach().numpy()[...] *= -1.5


def write_through_from_numpy_alias(factor: torch.Tensor) -> None:
    torch.from_numpy(factor.detach().numpy()).mul_(-1.5)


def write_through_set(factor: torch.Tensor) -> None:
    with torch.no_grad():
        factor.set_(factor.detach() * -1.5)


def write_through_data(factor: torch.Tensor) -> None:
    factor.data.mul_(-1.5)


WRITES = [write_through_numpy, write_through_from_numpy_alias, write_through_set, write_through_data]


@pytest.mark.parametrize("write", WRITES, ids=[write.__name__ for write in WRITES])
def test_unversioned_write_to_a_factor_is_seen(write, monkeypatch):
    model, _ = make(MLP_CASE)
    inputs = MLP_CASE.inputs()
    before = no_grad_output(MLP_CASE, model, inputs)
    write(gfa_peft.factors(model)[1])  # A
    expect_fresh(MLP_CASE, model, inputs, monkeypatch, stale=before)


def test_base_weight_assigned_twice_without_a_forward_is_seen(monkeypatch):
    """`load_state_dict(assign=True)` puts new tensors in, which can land at the freed address with the same
    version (on the code before weak references: 6 of these 10 tries): the cache holds the weight it was built
    from by a weak reference, so such a tensor is still another one."""
    model, _ = make(LLAMA)
    inputs = LLAMA.inputs()
    base_layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer  # loaded past the GfaLayer
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(base_layer.weight.shape, generator=generator) for _ in range(4)]

    def load(weight):
        base_layer.load_state_dict({"weight": weight.clone()}, strict=False, assign=True)

    for attempt in range(10):
        load(weights[attempt % 2])
        before = no_grad_output(LLAMA, model, inputs)
        load(weights[2])
        load(weights[3])
        expect_fresh(LLAMA, model, inputs, monkeypatch, stale=before)


class LinearLoadingThroughData(nn.Linear):
    """A layer whose loader writes through `.data`, as some quantization libraries' do: no version is bumped."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.weight.data.copy_(state_dict[prefix + "weight"])
        self.bias.data.copy_(state_dict[prefix + "bias"])


def test_base_layer_loaded_through_data_is_seen(monkeypatch):
    base = MLP_CASE.model()
    loading = LinearLoadingThroughData(10, 20)
    loading.load_state_dict(base.lin0.state_dict())
    base.lin0 = loading
    model = get_peft_model(base, gfa_peft.GfaConfig(r=2, init_weights=False, **MLP_CASE.config)).eval()
    inputs = MLP_CASE.inputs()
    before = no_grad_output(MLP_CASE, model, inputs)
    state = model.base_model.model.lin0.state_dict()
    model.base_model.model.lin0.load_state_dict({**state, "base_layer.weight": state["base_layer.weight"] * -1.0})
    expect_fresh(MLP_CASE, model, inputs, monkeypatch, stale=before)


def test_factor_comparison_is_bit_for_bit():
    zero, nan = torch.tensor([0.0, 1.0]), torch.tensor([float("nan"), 1.0])
    assert not inference_cache.same_bits(zero, torch.tensor([-0.0, 1.0]))  # -0.0 can give another product
    assert inference_cache.same_bits(nan, nan.clone())  # a NaN factor's weight is still reused
    assert not inference_cache.same_bits(zero, zero.double())
    assert not inference_cache.same_bits(zero, zero.reshape(2, 1))


@pytest.fixture
def count_comparisons(monkeypatch):
    calls = []

    def counting(*args):
        calls.append(1)
        return real(*args)

    real = inference_cache.same_bits
    monkeypatch.setattr(inference_cache, "same_bits", counting)
    return calls


def test_factors_are_compared_once_per_model_pass_and_per_call_outside_one(count_comparisons):
    model, _ = make(LLAMA)  # 4 adapted modules, one adapter: B and A
    inputs = LLAMA.inputs()
    for passes in (1, 2, 3):
        no_grad_output(LLAMA, model, inputs)
        assert len(count_comparisons) == 2 * (passes - 1)  # the first pass copies, later ones compare
    assert cached_entries(model) == LLAMA.n_targets
    copied = copy.deepcopy(model)  # the copy's hooks mark the copy's passes
    no_grad_output(LLAMA, copied, inputs)
    assert len(count_comparisons) == 6
    layer = layers(model)[0]
    with torch.no_grad():
        for calls in (1, 2):
            layer(torch.randn(1, 3, layer.in_features))
            assert len(count_comparisons) == 6 + 2 * calls


def test_saved_whole_model_leaves_its_cached_weights_behind_and_marks_its_own_passes(count_comparisons):
    model, _ = make(LLAMA)
    inputs = LLAMA.inputs()
    expected = no_grad_output(LLAMA, model, inputs)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert cached_entries(loaded) == 0
    assert torch.equal(no_grad_output(LLAMA, loaded, inputs), expected)
    assert len(count_comparisons) == 2 and cached_entries(loaded) == LLAMA.n_targets


def test_unload_removes_the_model_pass_hooks():
    model, reference = make(MLP_CASE)
    assert not reference._forward_pre_hooks and not reference._forward_hooks
    unloaded = model.merge_and_unload()
    assert not unloaded._forward_pre_hooks and not unloaded._forward_hooks


def test_trainer_evaluating_between_steps_with_its_default_optimiser(tmp_path, monkeypatch):
    """End to end with transformers' `Trainer` and its default fused AdamW, evaluating after every step (its
    `model.train()` before each step also drops the entries, so this held on the code before content checks)."""
    model, _ = make(LLAMA)
    batch = token_batch()["input_ids"]
    rows = [{"input_ids": ids, "labels": ids} for ids in batch]
    predictions, uncached = [], []

    class KeepUncachedOutput(transformers.TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, **kwargs):
            with torch.no_grad():
                uncached.append(uncached_output(LLAMA, model, {"input_ids": batch, "labels": batch}, monkeypatch))

    def keep_predictions(prediction) -> dict:
        predictions.append(torch.from_numpy(prediction.predictions))
        return {}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, eval_strategy="steps", eval_steps=1, learning_rate=0.05,
        per_device_train_batch_size=len(rows), per_device_eval_batch_size=len(rows), save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no",
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows,
                                   compute_metrics=keep_predictions, callbacks=[KeepUncachedOutput()])
    trainer.train()
    assert args.optim == OptimizerNames.ADAMW_TORCH_FUSED and trainer.optimizer.defaults["fused"]
    assert len(predictions) == len(uncached) == 3
    for reused, expected in zip(predictions, uncached):
        assert torch.equal(reused, expected)
    assert not torch.allclose(predictions[0], predictions[-1])
