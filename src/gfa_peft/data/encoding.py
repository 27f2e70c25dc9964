"""Turning task examples into token ids: classification inputs, and multiple-choice sequences for a causal LM.

Multiple choice follows docs/data.md: choice i of a question is the token sequence of `query` followed by the
tokens of " " + choices[i], the two tokenised separately so every choice starts at the same token boundary.
Training uses the gold sequence with the causal-LM loss on the choice tokens only (the query's labels are
-100); scoring sums the choice tokens' log-likelihoods. A sequence longer than `max_length` loses tokens from
the start of its query, so the question just before the answer, and the answer itself, are always kept (training
cuts at the run's --max-length, scoring only at the model's context: training/evaluation.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label of the tokens the loss skips (PyTorch's and transformers' convention)."""


def encode_classification(tokenizer: PreTrainedTokenizerBase, data: Dataset, text_columns: Sequence[str],
                          max_length: int) -> list[dict]:
    """Each example's tokenizer inputs (a sentence or a pair, truncated to `max_length`) and its `label`."""
    texts = [list(data[column]) for column in text_columns]
    encoded = tokenizer(*texts, truncation=True, max_length=max_length)
    return [{**{key: values[index] for key, values in encoded.items()}, "label": label}
            for index, label in enumerate(list(data["label"]))]


@dataclass(frozen=True)
class ChoiceSequence:
    """One (question, choice) pair as ids: the choice's tokens are the last `choice_length` of `input_ids`."""

    question: int
    input_ids: list[int]
    choice_length: int


def choice_sequences(tokenizer: PreTrainedTokenizerBase, data: Dataset, max_length: int) -> list[ChoiceSequence]:
    """Every choice of every question, in order (question 0's choices, then question 1's, ...)."""
    queries = tokenizer(list(data["query"]))["input_ids"]
    sequences = []
    for question, (query, choices) in enumerate(zip(queries, list(data["choices"]), strict=True)):
        choice_ids = tokenizer([" " + choice for choice in choices], add_special_tokens=False)["input_ids"]
        for ids in choice_ids:
            kept_query = query[-max(1, max_length - len(ids)):]
            sequences.append(ChoiceSequence(question, kept_query + ids, len(ids)))
    return sequences


def encode_choice_training(tokenizer: PreTrainedTokenizerBase, data: Dataset, max_length: int) -> list[dict]:
    """Each question's gold sequence with causal-LM labels on the answer tokens only."""
    gold = Dataset.from_dict({
        "query": list(data["query"]),
        "choices": [[choices[label]] for choices, label in zip(list(data["choices"]), list(data["label"]), strict=True)],
    })
    examples = []
    for sequence in choice_sequences(tokenizer, gold, max_length):
        query_length = len(sequence.input_ids) - sequence.choice_length
        examples.append({"input_ids": sequence.input_ids, "attention_mask": [1] * len(sequence.input_ids),
                         "labels": [IGNORE_INDEX] * query_length + sequence.input_ids[query_length:]})
    return examples
