"""lm-evaluation-harness scores a GFA adapter as `gfa train` does, question by question (slow: the bundled SmolLM2,
and lm-eval, which the dev extra installs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from gfa_peft.data.encoding import choice_sequences
from gfa_peft.training.evaluation import choice_log_likelihoods, predict_choices
from gfa_peft.training.run import RunConfig, RunConfigError, execute, prepare

QUESTIONS = 30
TASK = "gfa_questions"
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {questions}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_bytes
"""
"""A local multiple-choice task on our questions, scored as lm-eval scores its own (choices joined by " ")."""
HARNESS_METRICS = {"sum": "acc", "per-char": "acc_norm", "per-byte": "acc_bytes"}
"""Each --choice-score and the harness's metric that ranks the choices alike."""


def harness_samples(base: Path, adapter: Path, questions: list[dict], folder: Path) -> list[dict]:
    """lm-eval's per-question record (its metrics and log-likelihoods) of `questions`, scored by `lm_eval` run as
    a command on the base model with the adapter, in float32 on the CPU."""
    data, tasks, output = folder / "questions.jsonl", folder / "tasks", folder / "harness"
    data.write_text("".join(json.dumps(question) + "\n" for question in questions), encoding="utf-8")
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, questions=data), encoding="utf-8")
    # `python -m lm_eval` is the `lm_eval` command, in a process that never imports gfa_peft itself: the installed
    # package's start-up hook registers GFA when the harness imports PEFT.
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf",
                    "--model_args", f"pretrained={base},peft={adapter},dtype=float32", "--tasks", TASK,
                    "--include_path", str(tasks), "--device", "cpu", "--batch_size", "8", "--log_samples",
                    "--output_path", str(output)],
                   check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    (samples,) = output.rglob(f"samples_{TASK}_*.jsonl")
    records = [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines()]
    return sorted(records, key=lambda record: record["doc_id"])


@pytest.mark.slow
def test_lm_eval_scores_a_gfa_adapter_question_by_question_as_gfa_train(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed: pip install lm-eval==0.4.13")
    try:
        run = prepare(RunConfig(model="smollm2", task="arc_easy", method="gfa", anchor="1", steps=4, lr=1e-2,
                                max_train_examples=32, max_eval_examples=QUESTIONS, choice_score="per-char"))
    except RunConfigError as error:
        pytest.skip(f"bundled assets not installed: {error}")
    metrics = execute(run, tmp_path / "run", progress=False)
    adapter = tmp_path / "run" / "adapter"
    questions = [{"query": row["query"], "choices": row["choices"], "label": row["label"]} for row in run.eval_data]
    samples = harness_samples(run.model_dir, adapter, questions, tmp_path)
    assert [sample["doc"] for sample in samples] == questions

    tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run.model_dir, dtype=torch.float32),
                                      adapter).eval()
    labels = [question["label"] for question in questions]
    for choice_score, metric in HARNESS_METRICS.items():
        predictions = predict_choices(model, tokenizer, run.eval_data, choice_score, batch_size=8, progress=False)
        assert [prediction == label for prediction, label in zip(predictions, labels, strict=True)] == \
            [sample[metric] == 1.0 for sample in samples], choice_score
    # gfa train's own per-char accuracy is the harness's acc_norm
    assert metrics["accuracy"] == sum(sample["acc_norm"] for sample in samples) / QUESTIONS

    # The choices' log-likelihoods agree with the adapter's and not with the base model's: the harness ran GFA.
    sequences = choice_sequences(tokenizer, run.eval_data, max_length=model.config.max_position_embeddings)
    adapted = choice_log_likelihoods(model, sequences, tokenizer.pad_token_id, batch_size=8, progress=False)
    with model.disable_adapter():
        base = choice_log_likelihoods(model, sequences, tokenizer.pad_token_id, batch_size=8, progress=False)
    harness = [float(response[0]) for sample in samples for response in sample["filtered_resps"]]
    assert harness == pytest.approx(adapted, abs=1e-3)
    assert max(abs(ours - theirs) for ours, theirs in zip(base, harness, strict=True)) > 0.1
