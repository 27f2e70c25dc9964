"""GFA on a bitsandbytes 8-bit / 4-bit base (QLoRA-style), when bitsandbytes is installed.

bitsandbytes is not a dependency; these tests skip without it. Reference: the same quantized base
with the adapter disabled and each target's dense update x (s * slice(B A))^T added by a hook.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import gfa_peft
from gfa_peft import GfaConfig, GfaLayer
from references import reference_scale
from toy_models import token_batch

pytest.importorskip("bitsandbytes")

QUANTIZATIONS = {
    "8bit": BitsAndBytesConfig(load_in_8bit=True),
    "4bit": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
}


def save_quantizable_llama(folder):
    # 64 wide: bitsandbytes' 4-bit CPU kernels need in_features to be a multiple of their block size (64).
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return save_quantizable_llama(tmp_path_factory.mktemp("base"))


def quantized_gfa(folder, quantization):
    quantized = QUANTIZATIONS[quantization]
    base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantized, device_map="cpu")
    torch.manual_seed(0)
    return get_peft_model(base, GfaConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False))


def dense_reference_logits(model, ids):
    """Logits of the quantized base plus each module's update, formed densely from the full B A."""
    B, A = gfa_peft.factors(model)
    layout = gfa_peft.layout_of(model)
    flat = reference_scale(model.peft_config["default"]) * (B @ A).reshape(-1)
    hooks = []
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, GfaLayer):
            piece = layout[name]
            delta = flat[piece.offset : piece.end].view(piece.shape)
            hooks.append(module.base_layer.register_forward_hook(
                lambda layer, args, out, delta=delta: out + F.linear(args[0], delta)))
    with model.disable_adapter():
        logits = model(input_ids=ids).logits
    for hook in hooks:
        hook.remove()
    return logits


@pytest.mark.parametrize("quantization", sorted(QUANTIZATIONS))
def test_forward_and_factor_gradients_match_the_dense_reference(base_folder, quantization):
    model = quantized_gfa(base_folder, quantization)
    model.train()
    assert all(p.dtype == torch.float32 for p in gfa_peft.factors(model))
    ids = token_batch()["input_ids"]
    logits = model(input_ids=ids).logits
    logits.pow(2).mean().backward()
    grads = [p.grad.clone() for p in gfa_peft.factors(model)]
    model.zero_grad()
    reference = dense_reference_logits(model, ids)
    reference.pow(2).mean().backward()
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    for grad, factor in zip(grads, gfa_peft.factors(model)):
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, factor.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("quantization", sorted(QUANTIZATIONS))
def test_training_moves_only_the_factors_and_merging_refuses_clearly(base_folder, quantization):
    model = quantized_gfa(base_folder, quantization)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    ids = token_batch()["input_ids"]
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)
    with pytest.raises(NotImplementedError, match="merge the adapter into the unquantized checkpoint"):
        model.merge_and_unload()
