"""Gradient checkpointing recomputes GFA layers in backward and gives the same gradients."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import gfa_peft
from gfa_peft import GfaConfig, GfaLayer
from toy_models import tiny_llama, token_batch


def factor_grads(dtype=torch.float32, dropout=0.0, checkpointing=None):
    """Factor gradients of one LM-loss backward; `checkpointing` is None or transformers' kwargs.
    Also returns how often the first adapted layer ran forward (twice when it was recomputed)."""
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_llama().to(dtype),
        GfaConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False, dropout=dropout),
    )
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    calls = []
    next(m for m in model.modules() if isinstance(m, GfaLayer)).register_forward_hook(lambda *_: calls.append(1))
    model.train()
    ids = token_batch()["input_ids"]
    torch.manual_seed(1)  # the dropout masks; checkpointing replays the RNG state in its recompute
    model(input_ids=ids, labels=ids).loss.backward()
    return [p.grad for p in gfa_peft.factors(model)], len(calls)


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpointed_gradients_equal_plain_ones(use_reentrant, dropout):
    expected, plain_calls = factor_grads(dropout=dropout)
    grads, calls = factor_grads(dropout=dropout, checkpointing={"use_reentrant": use_reentrant})
    assert (plain_calls, calls) == (1, 2)
    for grad, reference in zip(grads, expected):
        assert grad is not None and grad.abs().sum() > 0
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-7)


def test_checkpointing_a_bf16_base_keeps_fp32_factor_gradients():
    expected, _ = factor_grads(dtype=torch.bfloat16)
    grads, calls = factor_grads(dtype=torch.bfloat16, checkpointing={"use_reentrant": False})
    assert calls == 2
    for grad, reference in zip(grads, expected):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, reference, rtol=1e-3, atol=1e-5)
