"""One matrix of PEFT behaviours over toy models (MLP, Conv2d+Embedding, Llama, GPT-2, BERT classifier)."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

import gfa_peft
from gfa_peft import GfaConfig, GfaLayer
from references import reference_scale
from toy_models import CASES, Case

IDS = [case.name for case in CASES]
GAINS = [pytest.param(False, id="shared"), pytest.param(True, id="module-gain")]
"""The adapter as the paper has it, and with a learned gain per module (`GfaConfig.module_gain`)."""


def make(case: Case, seed: int = 0, **overrides):
    base = case.model(seed)
    reference = copy.deepcopy(base)
    config = GfaConfig(**{"r": 2, **case.config, **overrides})
    model = get_peft_model(base, config)
    if config.module_gain:  # gains other than their starting 1, one per module, so a gain applied twice or to
        gains = model.base_model.gfa_gain["default"].weight  # the wrong module shows
        with torch.no_grad():
            gains.copy_(torch.linspace(0.5, 1.5, len(gains)))
    return model, reference


def gains_of(model, adapter_name="default") -> torch.Tensor:
    """The adapter's module gains in layout order; ones for an adapter without them."""
    tuner = model.base_model
    if adapter_name in tuner.gfa_gain:
        return tuner.gfa_gain[adapter_name].weight.detach()
    return torch.ones(len(gfa_peft.layout_of(model, adapter_name).modules))


def dense_reference_deltas(model, adapter_name="default") -> dict[str, torch.Tensor]:
    """Independent of the scatter code: form M = BA in full, flatten, cut at the offsets, reshape, times the
    scale and the module's gain."""
    B, A = gfa_peft.factors(model, adapter_name)
    layout = gfa_peft.layout_of(model, adapter_name)
    scale = reference_scale(model.peft_config[adapter_name])
    flat = (B @ A).detach().reshape(-1)
    return {piece.name: scale * gain * flat[piece.offset : piece.offset + piece.numel].view(piece.shape)
            for piece, gain in zip(layout.modules, gains_of(model, adapter_name))}


def apply_deltas(reference, deltas):
    """A plain copy of the base model with W + delta written into its weights."""
    patched = copy.deepcopy(reference)
    modules = dict(patched.named_modules())
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = modules[name].weight
            weight += delta.T if isinstance(modules[name], Conv1D) else delta
    return patched


def train_steps(model, case, steps=3, lr=0.05):
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        loss = case.output(model, case.inputs()).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("module_gain", GAINS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_trainable_count_is_r_times_m_plus_k(case, module_gain):
    model, _ = make(case, r=3, module_gain=module_gain)
    layout = gfa_peft.layout_of(model)
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    assert layout.r == 3 and len(layout.modules) == case.n_targets
    gains = case.n_targets if module_gain else 0
    assert sum(trainable.values()) == 3 * (layout.m + layout.k) + gains + case.extra_trainable(model.base_model.model)
    factor_names = {name for name in trainable if "gfa_" in name}
    assert factor_names == {"base_model.gfa_B.default.weight", "base_model.gfa_A.default.weight",
                            *(["base_model.gfa_gain.default.weight"] if module_gain else [])}
    assert all("gfa_" in name or "classifier" in name for name in trainable)
    assert model.get_nb_trainable_parameters()[0] == sum(trainable.values())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_adapter_starts_as_exact_noop(case):
    model, reference = make(case)
    assert all(not torch.any(delta) for delta in gfa_peft.delta_weights(model).values())
    inputs = case.inputs()
    # The update is exactly zero; the outputs agree to the last bits only, since a Conv2d's bias is added after
    # the convolution here where the plain layer fuses it (oneDNN rounds the two differently on some CPUs).
    torch.testing.assert_close(case.output(model, inputs), case.output(reference, inputs), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("module_gain", GAINS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_and_training_match_dense_reference(case, module_gain):
    model, reference = make(case, init_weights=False, scale=0.7, module_gain=module_gain)
    inputs = case.inputs()
    expected = case.output(apply_deltas(reference, dense_reference_deltas(model)), inputs)
    torch.testing.assert_close(case.output(model, inputs), expected, rtol=1e-5, atol=1e-5)
    before = [p.detach().clone() for p in (*gfa_peft.factors(model), gains_of(model))]
    train_steps(model, case)
    after = (*gfa_peft.factors(model), gains_of(model))
    assert [not torch.equal(b, p) for b, p in zip(before, after)] == [True, True, module_gain]
    # the frozen base weights did not move
    frozen = {n.replace("base_layer.", ""): p for n, p in model.base_model.model.named_parameters() if "classifier" not in n}
    for name, param in reference.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    if hasattr(reference, "classifier"):  # modules_to_save trained too: the reference takes the trained head
        reference.classifier.load_state_dict(model.base_model.model.classifier.modules_to_save["default"].state_dict())
    expected = case.output(apply_deltas(reference, dense_reference_deltas(model)), inputs)
    torch.testing.assert_close(case.output(model, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module_gain", GAINS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unfrozen_base_weights_get_the_dense_reference_gradient(case, module_gain):
    """A user who also trains the base weights (`requires_grad_(True)` on them, as with LoRA) gets their true
    gradient: the same as in a plain model whose weights are W + delta."""
    model, reference = make(case, init_weights=False, scale=0.7, module_gain=module_gain)
    patched = apply_deltas(reference, dense_reference_deltas(model))
    adapted = {name.replace("base_layer.", ""): param for name, param in model.base_model.model.named_parameters()
               if "base_layer.weight" in name}
    for param in adapted.values():
        param.requires_grad_(True)
    inputs = case.inputs()
    case.output(model, inputs).float().pow(2).mean().backward()
    case.output(patched, inputs).float().pow(2).mean().backward()
    expected = dict(patched.named_parameters())
    assert adapted
    for name, param in adapted.items():
        torch.testing.assert_close(param.grad, expected[name].grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", [c for c in CASES if c.name != "bert_seq_cls"], ids=lambda c: c.name)
def test_disable_adapter_gives_base_outputs(case):
    model, reference = make(case, init_weights=False)
    inputs = case.inputs()
    assert not torch.allclose(case.output(model, inputs), case.output(reference, inputs))
    with model.disable_adapter():
        assert torch.equal(case.output(model, inputs), case.output(reference, inputs))
    assert not torch.allclose(case.output(model, inputs), case.output(reference, inputs))


@pytest.mark.parametrize("module_gain", GAINS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_unmerge_round_trip(case, module_gain):
    model, _ = make(case, init_weights=False, module_gain=module_gain)
    inputs = case.inputs()
    adapted = case.output(model, inputs)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    model.merge_adapter()
    assert all(layer.merged for layer in model.modules() if isinstance(layer, GfaLayer))
    torch.testing.assert_close(case.output(model, inputs), adapted, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    for name, param in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(param, weights[name], rtol=1e-6, atol=1e-6 * weights[name].abs().max().item())
    torch.testing.assert_close(case.output(model, inputs), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module_gain", GAINS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_and_unload_gives_plain_modules(case, module_gain):
    model, reference = make(case, init_weights=False, module_gain=module_gain)
    inputs = case.inputs()
    adapted = case.output(model, inputs)
    merged = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, GfaLayer) for m in merged.modules())
    assert type(merged) is type(reference)
    torch.testing.assert_close(case.output(merged, inputs), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module_gain", GAINS)
@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "pickle"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_save_load_round_trip(case, safe_serialization, module_gain, tmp_path):
    model, _ = make(case, init_weights=False, module_gain=module_gain)
    train_steps(model, case, steps=1)
    inputs = case.inputs()
    expected = case.output(model, inputs)
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    if safe_serialization:
        keys = set(load_file(os.path.join(tmp_path, "adapter_model.safetensors")))
        factor_keys = {"base_model.gfa_B", "base_model.gfa_A", *(["base_model.gfa_gain"] if module_gain else [])}
        assert factor_keys <= keys
        assert all("classifier" in key for key in keys - factor_keys)
        assert (keys != factor_keys) == (case.name == "bert_seq_cls")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(case.model(), tmp_path)
    assert not [w for w in caught if "missing" in str(w.message).lower()], [str(w.message) for w in caught]
    assert torch.equal(case.output(loaded, inputs), expected)
    assert gfa_peft.layout_of(loaded) == gfa_peft.layout_of(model)
    assert torch.equal(gains_of(loaded), gains_of(model))
    assert not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("module_gain", GAINS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_low_cpu_mem_usage_load(case, module_gain, tmp_path):
    model, _ = make(case, init_weights=False, module_gain=module_gain)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(case.model(), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in loaded.parameters())
    inputs = case.inputs()
    assert torch.equal(case.output(loaded, inputs), case.output(model, inputs))


def test_from_pretrained_is_trainable_resumes_training(tmp_path):
    case = CASES[2]
    model, _ = make(case)
    train_steps(model, case, steps=2)
    model.save_pretrained(tmp_path)
    resumed = PeftModel.from_pretrained(case.model(), tmp_path, is_trainable=True)
    trainable = {n for n, p in resumed.named_parameters() if p.requires_grad}
    assert trainable == {"base_model.gfa_B.default.weight", "base_model.gfa_A.default.weight"}
    before = [p.detach().clone() for p in gfa_peft.factors(resumed)]
    train_steps(resumed, case, steps=2)
    assert all(not torch.equal(b, p) for b, p in zip(before, gfa_peft.factors(resumed)))


def test_several_named_adapters_each_with_its_own_layout():
    case = CASES[2]
    model, reference = make(case, init_weights=False)
    model.add_adapter("mlp_only", GfaConfig(r=1, target_modules=["gate_proj"], init_weights=False, scale=0.5))
    first, second = gfa_peft.layout_of(model, "default"), gfa_peft.layout_of(model, "mlp_only")
    assert first.names != second.names and second.r == 1
    inputs = case.inputs()
    for name in ("default", "mlp_only"):
        model.set_adapter(name)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {f"base_model.gfa_B.{name}.weight", f"base_model.gfa_A.{name}.weight"}
        expected = case.output(apply_deltas(reference, dense_reference_deltas(model, name)), inputs)
        torch.testing.assert_close(case.output(model, inputs), expected, rtol=1e-5, atol=1e-5)
    model.delete_adapter("mlp_only")
    assert set(model.base_model.gfa_B) == {"default"} and "mlp_only" not in model.peft_config
    assert model.active_adapters == ["default"]
    expected = case.output(apply_deltas(reference, dense_reference_deltas(model)), inputs)
    torch.testing.assert_close(case.output(model, inputs), expected, rtol=1e-5, atol=1e-5)


def test_two_adapters_active_together_add_their_updates():
    case = CASES[0]
    model, reference = make(case, init_weights=False)
    model.add_adapter("other", GfaConfig(r=1, target_modules=["lin1", "lin2"], init_weights=False))
    model.base_model.set_adapter(["default", "other"])
    deltas = dense_reference_deltas(model, "default")
    for name, delta in dense_reference_deltas(model, "other").items():
        deltas[name] = deltas.get(name, 0) + delta
    inputs = case.inputs()
    torch.testing.assert_close(case.output(model, inputs), case.output(apply_deltas(reference, deltas), inputs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_with_fp32_factors(dtype):
    case = CASES[2]
    base = case.model().to(dtype)
    reference = copy.deepcopy(base)
    model = get_peft_model(base, GfaConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False))
    assert all(p.dtype == torch.float32 for p in gfa_peft.factors(model))
    inputs = case.inputs()
    out = case.output(model, inputs)
    assert out.dtype == dtype
    expected = case.output(apply_deltas(reference, {n: d.to(dtype) for n, d in dense_reference_deltas(model).items()}), inputs)
    torch.testing.assert_close(out, expected, rtol=0.05, atol=0.05)
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in gfa_peft.factors(model))
    merged = model.merge_and_unload()
    assert all(p.dtype == dtype for p in merged.parameters())


def test_autocast_bf16_training_step():
    case = CASES[2]
    model, _ = make(case, init_weights=False)
    inputs = case.inputs()
    model.train()
    case.output(model, inputs).float().pow(2).mean().backward()
    reference_grads = [p.grad.clone() for p in gfa_peft.factors(model)]
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = case.output(model, inputs).float().pow(2).mean()
    loss.backward()
    for grad, reference in zip((p.grad for p in gfa_peft.factors(model)), reference_grads):
        assert grad.dtype == torch.float32
        assert (grad - reference).norm() <= 0.1 * reference.norm()


def test_dropout_only_touches_the_adapter_path():
    case = CASES[0]
    model, reference = make(case, init_weights=False, dropout=0.5)
    inputs = case.inputs()
    model.eval()
    expected = case.output(apply_deltas(reference, dense_reference_deltas(model)), inputs)
    torch.testing.assert_close(case.output(model, inputs), expected)
    model.train()
    torch.manual_seed(3)
    out = case.output(model, inputs)
    assert not torch.allclose(out, expected)
    out.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gfa_peft.factors(model))


def test_default_target_modules_follow_peft_mapping():
    model = get_peft_model(CASES[2].model(), GfaConfig(r=2))
    assert {name.rsplit(".", 1)[-1] for name in gfa_peft.layout_of(model).names} == {"q_proj", "v_proj"}


def test_module_order_by_name_and_seed():
    case = CASES[2]
    by_model = gfa_peft.layout_of(make(case)[0]).names
    by_name = gfa_peft.layout_of(make(case, module_order="by_name")[0]).names
    seeded = gfa_peft.layout_of(make(case, module_order=3)[0]).names
    assert by_model == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert by_name == [f"model.layers.{i}.self_attn.{p}" for p in ("q_proj", "v_proj") for i in range(2)]
    assert sorted(seeded) == sorted(by_model)
    assert seeded == gfa_peft.layout_of(make(case, module_order=3)[0]).names


def test_introspection_api():
    case = CASES[3]  # GPT-2: Conv1D stores (in, out)
    model, _ = make(case, init_weights=False)
    layout = gfa_peft.layout_of(model)
    B, A = gfa_peft.factors(model)
    assert B is model.base_model.gfa_B["default"].weight and B.shape == (layout.m, layout.r) and A.shape == (layout.r, layout.k)
    assert layout.d == sum(p.numel for p in layout.modules) and layout.m * layout.k - layout.d == layout.padding
    assert layout.offsets == [sum(p.numel for p in layout.modules[:i]) for i in range(len(layout.modules))]
    deltas = gfa_peft.delta_weights(model)
    modules = dict(model.base_model.model.named_modules())
    reference = dense_reference_deltas(model)
    for piece in layout.modules:
        weight = modules[piece.name].get_base_layer().weight
        assert deltas[piece.name].shape == weight.shape
        assert piece.shape == (weight.shape[1], weight.shape[0])  # layout uses (out, in)
        torch.testing.assert_close(deltas[piece.name], reference[piece.name].T)


def test_deepcopy_keeps_layers_bound_to_their_own_factors():
    case = CASES[2]
    model, _ = make(case, init_weights=False)
    clone = copy.deepcopy(model)
    inputs = case.inputs()
    assert torch.equal(case.output(clone, inputs), case.output(model, inputs))
    with torch.no_grad():
        gfa_peft.factors(clone)[0].mul_(2.0)
    layers = [m for m in clone.modules() if isinstance(m, GfaLayer)]
    assert all(layer.gfa_B["default"] is clone.base_model.gfa_B["default"] for layer in layers)
    assert all(layer.gfa_A["default"] is clone.base_model.gfa_A["default"] for layer in layers)
    assert not torch.equal(case.output(clone, inputs), case.output(model, inputs))
    expected = case.output(apply_deltas(case.model(), dense_reference_deltas(clone)), inputs)
    torch.testing.assert_close(case.output(clone, inputs), expected, rtol=1e-5, atol=1e-5)
