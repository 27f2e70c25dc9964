"""Predictions on an evaluation split and the metrics of docs/data.md.

Examples are batched longest-first (least padding) and the predictions put back in the split's order.
A classifier predicts its largest logit. A causal LM answers a multiple-choice question with the choice whose
tokens have the largest summed log-likelihood after the whole query (lm-evaluation-harness's `acc`), or that sum over
the choice's length (`per-char`, `per-byte`: its `acc_norm` and `acc_bytes`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from gfa_peft.data.encoding import IGNORE_INDEX, ChoiceSequence, choice_sequences

Collator = Callable[[list[dict]], dict]


def _longest_first_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


@torch.no_grad()
def predict_classes(model: nn.Module, examples: list[dict], collate: Collator, batch_size: int,
                    progress: bool = True) -> list[int]:
    """The class each example's logits rank first."""
    model.eval()
    predictions = [0] * len(examples)
    batches = _longest_first_batches([len(example["input_ids"]) for example in examples], batch_size)
    for batch in tqdm(batches, desc="evaluating", unit="batch", disable=not progress, leave=False):
        inputs = collate([{key: value for key, value in examples[index].items() if key != "label"}
                          for index in batch])
        logits = model(**inputs).logits
        for index, predicted in zip(batch, logits.argmax(-1).tolist(), strict=True):
            predictions[index] = predicted
    return predictions


def last_hidden_states(model: nn.Module, **inputs: Any) -> torch.Tensor:
    """A causal LM's final hidden states (after its last norm), (batch, length, hidden), without the logits.

    The call goes through `model` itself, so PEFT adapters and a DDP wrapper take part as in a plain forward;
    `logits_to_keep=1` lets the LM head run at one position only instead of at every one.
    """
    return model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False).hidden_states[-1]


def token_log_likelihoods(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for each row of `hidden` (n, hidden): the LM head runs on these n rows only."""
    return -F.cross_entropy(head(hidden).float(), targets, reduction="none")


def answer_log_likelihoods(model: nn.Module, head: nn.Module, labels: torch.Tensor, **inputs: Any) -> torch.Tensor:
    """log p of every answer token of a batch (the positions of `labels` other than IGNORE_INDEX), the LM head run
    at the positions that predict them only: the terms of a multiple-choice run's training loss."""
    hidden = last_hidden_states(model, **inputs)
    targets = labels[:, 1:]  # token t is predicted at position t - 1
    rows, positions = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    return token_log_likelihoods(head, hidden[rows, positions], targets[rows, positions])


@dataclass
class _Packed:
    """The choices of one question that share their query, packed into one row: query, choice 1, choice 2, ..."""

    query: list[int]
    members: list[int] = field(default_factory=list)
    """Indices of the packed sequences, in the row's order."""
    length: int = 0


def _pack_by_query(sequences: list[ChoiceSequence]) -> list[_Packed]:
    # Choices of one question usually share their query; a long query truncated to fit a longer choice does not.
    rows: dict[tuple[int, tuple[int, ...]], _Packed] = {}
    for index, sequence in enumerate(sequences):
        query = sequence.input_ids[:len(sequence.input_ids) - sequence.choice_length]
        row = rows.setdefault((sequence.question, tuple(query)), _Packed(query, length=len(query)))
        row.members.append(index)
        row.length += sequence.choice_length
    return list(rows.values())


@torch.no_grad()
def choice_log_likelihoods(model: nn.Module, sequences: list[ChoiceSequence], pad_id: int, batch_size: int,
                           progress: bool = True) -> list[float]:
    """Each sequence's summed log-likelihood of its choice tokens given everything before them.

    A question's query runs once: its choices are packed after it into one row, each choice attending to the
    query and to itself only, at the positions it would have right after the query, so each gets exactly the
    log-likelihoods of its own sequence. The LM head runs only at the positions that predict a choice token.
    `batch_size` counts packed rows (questions).
    """
    model.eval()
    head = model.get_output_embeddings()
    dtype = next(model.parameters()).dtype
    scores = [0.0] * len(sequences)
    rows = _pack_by_query(sequences)
    batches = _longest_first_batches([row.length for row in rows], batch_size)
    for batch in tqdm(batches, desc="scoring choices", unit="batch", disable=not progress, leave=False):
        width = rows[batch[0]].length
        ids = torch.full((len(batch), width), pad_id)
        positions = torch.zeros((len(batch), width), dtype=torch.long)
        segments = torch.full((len(batch), width), -1)  # -1 padding, 0 the query, i the row's i-th choice
        predictors, targets, owners = [], [], []  # position predicting each choice token, the token, its sequence
        for row_number, row_index in enumerate(batch):
            row = rows[row_index]
            query_length = len(row.query)
            ids[row_number, :query_length] = torch.tensor(row.query)
            positions[row_number, :query_length] = torch.arange(query_length)
            segments[row_number, :query_length] = 0
            start = query_length
            for segment, index in enumerate(row.members, 1):
                sequence = sequences[index]
                choice = sequence.input_ids[len(sequence.input_ids) - sequence.choice_length:]
                end = start + len(choice)
                ids[row_number, start:end] = torch.tensor(choice, dtype=torch.long)
                positions[row_number, start:end] = torch.arange(query_length, query_length + len(choice))
                segments[row_number, start:end] = segment
                # each choice token is predicted at the position before it: the first one at the query's last
                before = [query_length - 1, *range(start, end - 1)][:len(choice)]
                predictors += [(row_number, position) for position in before]
                targets += choice
                owners += [index] * len(choice)
                start = end
        hidden = last_hidden_states(model, input_ids=ids, position_ids=positions,
                                    attention_mask=_packed_attention_mask(segments, dtype))
        if not targets:
            continue
        rows_at, positions_at = torch.tensor(predictors).T
        log_likelihoods = token_log_likelihoods(head, hidden[rows_at, positions_at], torch.tensor(targets))
        for index, value in zip(owners, log_likelihoods.tolist(), strict=True):
            scores[index] += value
    return scores


def _packed_attention_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive (batch, 1, length, length) mask of packed rows: a token sees the earlier tokens of its own
    segment and the query's (segment 0); padding (-1) sees earlier padding too, so no row is wholly masked."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same_or_query = (segments[:, :, None] == segments[:, None, :]) | (segments[:, None, :] == 0)
    visible = causal & same_or_query
    return torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)[:, None]


CHOICE_LENGTHS: dict[str, Callable[[str], int]] = {
    "per-char": len, "per-byte": lambda choice: len(choice.encode("utf-8"))}
"""The length each normalised --choice-score divides by, of the choice without the space that joins it to the
query: lm-evaluation-harness's acc_norm (characters) and acc_bytes (UTF-8 bytes)."""

SCORING_VERSIONS = {"classification": 1, "multiple_choice": 2}
"""The version of each task kind's evaluation rule, recorded with every run (a run recorded before versions existed
was scored by version 1), so a sweep never takes a run scored by an older rule for one scored as asked.
Multiple choice, version 2: the query is never cut to --max-length (that limit is training's), and per-char divides
by len(choice); version 1 cut the query's start to --max-length and divided per-char by len(" " + choice)."""


def choice_scores(sums: Sequence[float], choices: Sequence[Sequence[str]], choice_score: str) -> list[float]:
    """Each choice's score as `choice_score` ranks it: its summed log-likelihood (sum), or that over its length
    (CHOICE_LENGTHS); `sums` in the order of `choice_sequences`, every choice of question 0, then of question 1, ..."""
    if choice_score == "sum":
        return list(sums)
    lengths = [CHOICE_LENGTHS[choice_score](choice) for question_choices in choices for choice in question_choices]
    return [score / length for score, length in zip(sums, lengths, strict=True)]


def predict_choices(model: nn.Module, tokenizer: PreTrainedTokenizerBase, data: Dataset, choice_score: str,
                    batch_size: int, progress: bool = True) -> list[int]:
    """Each question's predicted choice (its index), scored on the whole query: a query is cut (from its start)
    only where a question is longer than the model's context, as lm-evaluation-harness cuts it."""
    sequences = choice_sequences(tokenizer, data, max_length=model.config.max_position_embeddings)
    sums = choice_log_likelihoods(model, sequences, tokenizer.pad_token_id, batch_size, progress)
    return best_choices(sequences, choice_scores(sums, data["choices"], choice_score))


def best_choices(sequences: list[ChoiceSequence], scores: list[float]) -> list[int]:
    """For each question, the index (within its choices) of the highest-scoring choice; ties to the first."""
    per_question: dict[int, list[float]] = {}
    for sequence, score in zip(sequences, scores, strict=True):
        per_question.setdefault(sequence.question, []).append(score)
    return [max(range(len(choice_scores)), key=choice_scores.__getitem__)
            for _, choice_scores in sorted(per_question.items())]


# ---------------------------------------------------------------- metrics

def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    return sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels)


def f1_positive(predictions: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class: 2 TP / (2 TP + FP + FN); 0 when there is neither a positive nor a prediction."""
    true_positive = sum(p == positive and y == positive for p, y in zip(predictions, labels, strict=True))
    predicted, actual = list(predictions).count(positive), list(labels).count(positive)
    return 2 * true_positive / (predicted + actual) if predicted + actual else 0.0


def matthews(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation, in its multi-class form (Gorodkin 2004), which is the usual MCC for two classes:
    (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2)), with c correct, s samples, p_k and t_k
    the predicted and true counts of class k. 0 when either side is constant."""
    samples = len(labels)
    correct = sum(p == y for p, y in zip(predictions, labels, strict=True))
    predicted, true = Counter(predictions), Counter(labels)
    classes = set(predicted) | set(true)
    covariance = correct * samples - sum(predicted[k] * true[k] for k in classes)
    spread = (samples**2 - sum(predicted[k] ** 2 for k in classes)) * (samples**2 - sum(true[k] ** 2 for k in classes))
    return covariance / math.sqrt(spread) if spread else 0.0


METRIC_FUNCTIONS = {"accuracy": accuracy, "f1": f1_positive, "matthews": matthews}


def task_metrics(names: Sequence[str], predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """The named metrics (accuracy, f1, matthews) of the predictions, as fractions."""
    return {name: METRIC_FUNCTIONS[name](predictions, labels) for name in names}


def majority_label(labels: Sequence[int]) -> int:
    """The most frequent label (ties to the smallest), the majority-class baseline's constant prediction."""
    counts = Counter(labels)
    return min(counts, key=lambda label: (-counts[label], label))
