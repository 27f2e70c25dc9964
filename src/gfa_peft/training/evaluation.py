"""Predictions on an evaluation split and the metrics of docs/data.md.

Examples are batched longest-first (least padding) and the predictions put back in the split's order.
A classifier predicts its largest logit. A causal LM answers a multiple-choice question with the choice whose
tokens have the largest summed log-likelihood after the query (no length normalisation).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from gfa_peft.data.encoding import ChoiceSequence

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


@torch.no_grad()
def choice_log_likelihoods(model: nn.Module, sequences: list[ChoiceSequence], pad_id: int, batch_size: int,
                           progress: bool = True) -> list[float]:
    """Each sequence's summed log-likelihood of its choice tokens given everything before them."""
    model.eval()
    scores = [0.0] * len(sequences)
    batches = _longest_first_batches([len(sequence.input_ids) for sequence in sequences], batch_size)
    for batch in tqdm(batches, desc="scoring choices", unit="batch", disable=not progress, leave=False):
        width = len(sequences[batch[0]].input_ids)
        ids = torch.full((len(batch), width), pad_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            length = len(sequences[index].input_ids)
            ids[row, :length] = torch.tensor(sequences[index].input_ids)
            mask[row, :length] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits
        for row, index in enumerate(batch):
            sequence = sequences[index]
            end = len(sequence.input_ids)
            positions = torch.arange(end - sequence.choice_length, end)
            # token t is predicted by the logits at position t - 1
            log_probs = logits[row, positions - 1].float().log_softmax(-1)
            scores[index] = log_probs.gather(-1, ids[row, positions, None]).sum().item()
    return scores


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
