"""Which transformers model a saved PEFT adapter was trained on: the class of its task type, with the label
count of the classifier head saved beside it.

A classifier is trained from a bare encoder checkpoint (MiniLM's is a `BertModel`) by wrapping it in
`AutoModelForSequenceClassification`, so the adapter's module names and its saved head are that model's, not
the base folder's own architecture's. `gfa merge` and the lens's adapter source both build the model this way.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft import PeftConfig


def head_label_count(config: PeftConfig, saved: Mapping[str, torch.Tensor]) -> int | None:
    """The label count of a classification adapter's saved head (rows of its `modules_to_save` weight), given the
    adapter's saved tensors by key; None for an adapter that is not a classifier's or saved no head."""
    if config.task_type not in ("SEQ_CLS", "TOKEN_CLS") or not config.modules_to_save:
        return None
    heads = [
        tensor for key, tensor in saved.items()
        if key.endswith(".weight") and key.rsplit(".", 2)[-2] in set(config.modules_to_save)
    ]
    return heads[0].shape[0] if heads else None
