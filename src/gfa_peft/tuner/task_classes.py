"""The transformers class each PEFT task type wraps (as PEFT's AutoPeftModelFor* classes do), so a base model built
with it has the module names the adapter was trained with. Used by the saved adapter's card, `gfa merge` and the
lens's adapter source."""

from __future__ import annotations

from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

TASK_MODEL_CLASSES = {
    "CAUSAL_LM": AutoModelForCausalLM,
    "SEQ_CLS": AutoModelForSequenceClassification,
    "SEQ_2_SEQ_LM": AutoModelForSeq2SeqLM,
    "TOKEN_CLS": AutoModelForTokenClassification,
    "QUESTION_ANS": AutoModelForQuestionAnswering,
    "FEATURE_EXTRACTION": AutoModel,
}
