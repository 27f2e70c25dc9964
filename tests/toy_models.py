"""Tiny models built from configs (no downloads) and their inputs, shared by the test matrix."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 7)
        self.lin2 = nn.Linear(7, 3, bias=False)

    def forward(self, x):
        return self.lin2(self.lin1(self.relu(self.lin0(x))))


class SharedWidth(nn.Module):
    """Three linear layers that all read 12 features: one input width, as the aligned grid needs."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 12)
        self.mid = nn.Linear(12, 12)
        self.out = nn.Linear(12, 5, bias=False)

    def forward(self, x):
        return self.out(torch.relu(self.mid(torch.relu(self.up(x)))))


class ConvEmbed(nn.Module):
    """An embedding feeding a 2-D convolution and a linear read-out."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 12, padding_idx=0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1, stride=2)
        self.head = nn.Linear(4 * 2 * 6, 5)

    def forward(self, ids):
        h = self.emb(ids).unsqueeze(1)  # (batch, 1, 4, 12)
        return self.head(self.conv(h).flatten(1))


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def tiny_bert_classifier() -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=64, num_labels=3,
    )
    return BertForSequenceClassification(config)


def token_batch(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 64, (2, 9), generator=generator)}


@dataclass
class Case:
    """A toy model, a GFA config for it and an input batch."""

    name: str
    build: Callable[[], nn.Module]
    config: dict
    inputs: Callable[[], dict]
    n_targets: int
    extra_trainable: Callable[[nn.Module], int] = field(default=lambda model: 0)

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build().eval()

    def output(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        out = model(**inputs)
        return out if isinstance(out, torch.Tensor) else out.logits


def _classifier_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.classifier.modules_to_save.parameters())


CASES = [
    Case("mlp", MLP, dict(target_modules=["lin0", "lin1"]), lambda: {"x": torch.randn(4, 10)}, 2),
    Case("conv_embedding", ConvEmbed, dict(target_modules=["emb", "conv", "head"]),
         lambda: {"ids": torch.randint(0, 11, (3, 4))}, 3),
    Case("llama", tiny_llama, dict(target_modules=["q_proj", "v_proj"]), token_batch, 4),
    Case("gpt2", tiny_gpt2, dict(target_modules=["c_attn", "c_proj"]), token_batch, 6),
    Case("bert_seq_cls", tiny_bert_classifier, dict(target_modules=["query", "value"], task_type="SEQ_CLS"),
         token_batch, 4, extra_trainable=_classifier_params),
]
