"""`find_targets` selects exactly the modules PEFT's LoRA wraps for the same `target_modules`."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from gfa_peft.targets import default_targets, find_targets, target_shapes


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config)


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32))


class Plain(nn.Module):
    """Not a transformers model: "all-linear" has no output layer to leave out."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), Conv1D(5, 6))
        self.out = nn.Linear(5, 2)


LLAMA = tiny_llama()
GPT2 = tiny_gpt2()


def peft_wrapped(model: nn.Module, target_modules) -> list[str]:
    """The module names PEFT's own LoRA wraps, in its order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=1, target_modules=target_modules))
    return list(peft_model.base_model.targeted_module_names)


def found(model: nn.Module, targets) -> list[str]:
    return [name for name, _ in find_targets(model, targets)]


@pytest.mark.parametrize(
    "model, targets",
    [
        (LLAMA, ["q_proj", "v_proj"]),
        (LLAMA, ["self_attn.q_proj", "layers.1.mlp.up_proj", "model.layers.2.self_attn.o_proj"]),
        (LLAMA, r".*\.(q|v)_proj"),
        (LLAMA, r"model\.layers\.[02]\..*proj"),
        (LLAMA, "all-linear"),
        (LLAMA, "ALL-LINEAR"),
        (LLAMA, ["lm_head"]),
        (GPT2, ["c_attn"]),
        (GPT2, "all-linear"),
        (Plain(), "all-linear"),
        (Plain(), ["inner.0", "2"]),
    ],
)
def test_matches_what_peft_wraps(model, targets):
    assert found(model, targets) == peft_wrapped(model, targets)


LLAMA_LINEAR_NAMES = [name for name, module in LLAMA.named_modules() if isinstance(module, nn.Linear)]


def name_suffixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[start:]) for start in range(len(parts))]


SUFFIXES = sorted({suffix for name in LLAMA_LINEAR_NAMES for suffix in name_suffixes(name)})


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(SUFFIXES), min_size=1, max_size=4, unique=True))
def test_random_name_lists_match_peft(targets):
    assert found(LLAMA, targets) == peft_wrapped(LLAMA, targets)


def test_all_linear_leaves_out_the_output_layer():
    names = found(LLAMA, "all-linear")
    assert "lm_head" not in names
    assert len(names) == 7 * LLAMA.config.num_hidden_layers


def test_nothing_matched_names_the_leaves():
    with pytest.raises(ValueError, match="match no module") as error:
        find_targets(LLAMA, ["query", "value"])
    message = str(error.value)
    assert "\n" not in message
    for leaf in ("q_proj", "v_proj", "gate_proj", "embed_tokens", "lm_head"):
        assert leaf in message
    with pytest.raises(ValueError, match="not found in the base model"):
        peft_wrapped(LLAMA, ["query", "value"])


def test_bad_regex_and_empty_list_are_value_errors():
    with pytest.raises(ValueError, match="regular expression"):
        find_targets(LLAMA, "q_proj(")
    with pytest.raises(ValueError, match="empty"):
        find_targets(LLAMA, [])


def test_shapes_are_out_in_for_linear_and_conv1d():
    llama_shapes = dict(target_shapes(LLAMA, ["q_proj", "k_proj"]))
    assert llama_shapes["model.layers.0.self_attn.q_proj"] == (16, 16)
    assert llama_shapes["model.layers.0.self_attn.k_proj"] == (8, 16)  # 2 KV heads of width 4
    gpt2_shapes = dict(target_shapes(GPT2, ["c_attn"]))
    assert gpt2_shapes["transformer.h.0.attn.c_attn"] == (48, 16)  # Conv1D stores (in, out) = (16, 48)


def test_default_targets_follow_peft():
    assert default_targets(LLAMA) == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="no default target modules"):
        default_targets(Plain())
