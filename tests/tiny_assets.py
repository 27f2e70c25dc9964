"""A fake asset cache for training tests: tiny BERT and Llama models with word-level tokenizers built here
(no downloads), saved under the names `minilm` and `smollm2`, and small tasks in the cache's format."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from datasets import ClassLabel, DatasetDict, Features, List, Value
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from gfa_peft.data.cache import DONE, asset_folder
from gfa_peft.data.tasks import dataset_from_rows

POSITIVE = ["good", "great", "fine", "lovely", "fun"]
NEGATIVE = ["bad", "awful", "dull", "poor", "boring"]
FILLER = ["the", "film", "plot", "was", "and", "a", "movie", "cast", "question", "answer", "yes", "no", "blue", "red",
          "sky", "grass", "is", "what", "colour", "of"]
WORDS = POSITIVE + NEGATIVE + FILLER


def word_tokenizer(specials: list[str]) -> tuple[Tokenizer, dict[str, int]]:
    """A word-level tokenizer over the special tokens, WORDS and a little punctuation, splitting at whitespace."""
    vocabulary = {token: index for index, token in enumerate(specials + WORDS + [":", "?", "."])}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token=specials[1]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer, vocabulary


def save_tiny_bert(folder: Path) -> Path:
    """A 2-layer BERT (hidden 16) and its tokenizer ([CLS] text [SEP], pairs with token type ids)."""
    tokenizer, vocabulary = word_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocabulary["[CLS]"]), ("[SEP]", vocabulary["[SEP]"])],
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocabulary), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, architectures=["BertModel"])
    BertModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def save_tiny_llama(folder: Path) -> Path:
    """A 2-layer Llama (hidden 16, q 16x16, v 8x16) and its tokenizer (no BOS, pads with </s>)."""
    tokenizer, vocabulary = word_tokenizer(["<pad>", "<unk>", "</s>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>", pad_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocabulary), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         pad_token_id=vocabulary["</s>"], eos_token_id=vocabulary["</s>"], bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def sentiment_rows(count: int, seed: int, prefix: str = "rt") -> list[dict]:
    """Short "reviews" whose label is whether positive words outnumber negative ones."""
    generator = random.Random(seed)
    rows = []
    for number in range(count):
        label = generator.randrange(2)
        words = generator.sample(POSITIVE if label else NEGATIVE, 2) + generator.sample(FILLER[:8], 3)
        generator.shuffle(words)
        rows.append({"id": f"{prefix}:{seed}:{number}", "text": " ".join(words), "label": label})
    return rows


def question_rows(count: int, seed: int) -> list[dict]:
    """Multiple-choice questions with three or four choices."""
    generator = random.Random(seed)
    rows = []
    for number in range(count):
        choices = generator.sample(["blue", "red", "good grass", "the sky is blue", "fun"], 3 + number % 2)
        rows.append({"id": f"q:{seed}:{number}", "query": "Question: what colour is the sky ?\nAnswer:",
                     "choices": choices, "label": generator.randrange(len(choices))})
    return rows


SENTIMENT = Features({"id": Value("string"), "text": Value("string"),
                      "label": ClassLabel(names=["negative", "positive"])})
MULTIPLE_CHOICE = Features({"id": Value("string"), "query": Value("string"), "choices": List(Value("string")),
                            "label": Value("int64")})


def save_task(cache: Path, name: str, splits: dict[str, list[dict]], features: Features) -> None:
    """A task folder as `gfa assets install` leaves it (empty splits are not saved, as there)."""
    folder = asset_folder("task", name, cache)
    DatasetDict({split: dataset_from_rows(rows, features) for split, rows in splits.items() if rows}).save_to_disk(
        str(folder))
    (folder / DONE).write_text(json.dumps({"asset": name, "splits": {s: len(r) for s, r in splits.items()}}))


def fake_cache(root: Path) -> Path:
    """A cache with `minilm` (tiny BERT), `smollm2` (tiny Llama) and the tasks rt, sst2, arc_easy and obqa."""
    for name, save in (("minilm", save_tiny_bert), ("smollm2", save_tiny_llama)):
        folder = save(asset_folder("model", name, root))
        (folder / DONE).write_text(json.dumps({"asset": name}))
    save_task(root, "rt", {"train": sentiment_rows(64, 0), "dev": sentiment_rows(16, 1), "test": sentiment_rows(24, 2)},
              SENTIMENT)
    save_task(root, "sst2", {"train": [], "dev": [], "test": sentiment_rows(12, 3, "sst2")}, SENTIMENT)
    save_task(root, "arc_easy", {"train": question_rows(24, 0), "dev": question_rows(6, 1), "test": question_rows(10, 2)},
              MULTIPLE_CHOICE)
    save_task(root, "obqa", {"train": question_rows(16, 3), "dev": question_rows(4, 4), "test": question_rows(7, 5)},
              MULTIPLE_CHOICE)
    return root
