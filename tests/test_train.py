"""`gfa train` and its parts on tiny models and tasks written here: run folders, counts, scoring, bad input."""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import gfa_peft  # noqa: F401  (registers GFA with PEFT for PeftModel.from_pretrained)
from gfa_peft.cli import main
from gfa_peft.training import run as train_module
from gfa_peft.data.encoding import IGNORE_INDEX, choice_sequences, encode_choice_training
from gfa_peft.training.evaluation import (
    best_choices,
    choice_log_likelihoods,
    choice_scores,
    f1_positive,
    majority_label,
    matthews,
)
from gfa_peft.data.tasks import load_task
from gfa_peft.defaults import GFA_SCALE_RULE
from gfa_peft.training.recipes import SHIPPED_LEARNING_RATES, rate_entry
from gfa_peft.training.run import RunConfig, RunConfigError, changed_settings, is_finished, prepare, run_record, train
from gfa_peft.layout import order_modules
from references import GFA_RULE_SUFFIX
from tiny_assets import sentiment_rows

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3


@pytest.fixture(scope="module")
def llama_dir(cache) -> Path:
    return cache / "models" / "smollm2"


def config(cache: Path, **fields) -> RunConfig:
    return RunConfig(**{"task": "rt", "steps": STEPS, "lr": 1e-2, "cache": str(cache), **fields})


def saved_tensor_sizes(adapter: Path) -> dict[str, int]:
    with safe_open(adapter / "adapter_model.safetensors", framework="pt") as file:
        return {key: file.get_slice(key).get_shape() for key in file.keys()}


# ---------------------------------------------------------------- a classification run, end to end

def test_run_folder_metrics_and_a_reloaded_adapter_reproduce_the_accuracy(cache, tmp_path):
    folder = tmp_path / "run"
    metrics = train(config(cache, method="gfa", anchor="1/2"), folder, progress=False)

    assert sorted(path.name for path in folder.iterdir()) == ["adapter", "config.json", "metrics.json",
                                                              "train_log.json"]
    assert json.loads((folder / "metrics.json").read_text()) == metrics
    assert {"accuracy", "majority_baseline", "adapter_params", "trainable_params", "train_seconds", "eval_seconds",
            "wall_seconds", "steps"} <= metrics.keys()
    assert metrics["steps"] == STEPS and metrics["eval_split"] == "test"
    record = json.loads((folder / "config.json").read_text())
    assert record["config"]["anchor"] == "1/2" and record["resolved"]["targets"] == ["query", "value"]

    # the adapter count is what the saved factors hold (the head is saved too, but is not the adapter's)
    sizes = saved_tensor_sizes(folder / "adapter")
    adapter_sizes = [math.prod(shape) for key, shape in sizes.items() if "gfa_" in key]
    assert metrics["adapter_params"] == sum(adapter_sizes)
    # tiny BERT, q+v: four 16x16 modules, d = 1024, m = k = 32; "1/2" is round(0.3 x 4 x 32) = 38 -> r = 1
    assert metrics["adapter_params"] == 1 * (32 + 32) and metrics["budget"] == 38

    # the saved adapter on a fresh base predicts the test split with the reported accuracy
    model_dir = cache / "models" / "minilm"
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model = PeftModel.from_pretrained(base, folder / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    _, data = load_task("rt", cache)
    correct = 0
    for row in data["test"]:
        with torch.no_grad():
            logits = model(**tokenizer(row["text"], return_tensors="pt")).logits
        correct += int(logits.argmax(-1).item() == row["label"])
    assert metrics["accuracy"] == correct / data["test"].num_rows

    labels = list(data["test"]["label"])
    majority = max(set(data["train"]["label"]), key=list(data["train"]["label"]).count)
    assert metrics["majority_baseline"] == labels.count(majority) / len(labels)


@pytest.mark.parametrize("method, anchor, expected", [
    ("lora", "1", 1 * 4 * (16 + 16)),                 # r (p + q) per module
    ("dora", "1", 1 * 4 * (16 + 16) + 4 * 16),        # + one magnitude per output row
    ("vera", "1", 4 * 16 + 4 * 16),                   # sum p + N r with r = (128 - 64) / 4 = 16
    ("vblora", "1", 3 * (16 + 4 * 128 // 16)),        # n (L + R sum(p + q) / L), L = 16, n = 128 / 48 -> 3
])
def test_every_method_trains_at_its_budget_placement(cache, tmp_path, method, anchor, expected):
    metrics = train(config(cache, method=method, anchor=anchor), tmp_path / method, progress=False)
    assert metrics["adapter_params"] == expected
    assert is_finished(tmp_path / method)


def test_explicit_rank_overrides_the_anchor(cache, tmp_path):
    metrics = train(config(cache, method="lora", rank=8), tmp_path / "lora-r8", progress=False)
    assert metrics["knobs"] == {"r": 8} and metrics["anchor"] is None
    assert metrics["adapter_params"] == 8 * 4 * (16 + 16)
    assert prepare(config(cache, method="lora", rank=8)).name == "lora-r8-s0-lr0.01"


def test_module_order_reaches_the_gfa_adapter_and_names_the_run(cache, tmp_path):
    metrics = train(config(cache, method="gfa", anchor="1", module_order="3"), tmp_path / "gfa", progress=False)
    assert metrics["knobs"]["module_order"] == 3
    saved = json.loads((tmp_path / "gfa" / "adapter" / "adapter_config.json").read_text())
    assert saved["module_order"] == 3
    in_model_order = [f"bert.encoder.layer.{layer}.attention.self.{name}" for layer in range(2)
                      for name in ("query", "value")]
    names = [name.removeprefix("base_model.model.") for name, _, _ in saved["layout"]["modules"]]
    assert names == order_modules(in_model_order, 3) != in_model_order
    assert prepare(config(cache, method="gfa", anchor="1", module_order="by_name")).name == \
        f"gfa-1-s0-order-by_name-lr0.01{GFA_RULE_SUFFIX}"


def test_aligned_grid_trains_at_its_placement_and_names_the_run(cache, tmp_path):
    # tiny BERT's query, key and value: six 16 x 16 modules, d = 1536; square 40 x 39, aligned 48 x 32 (k = 2 x 16)
    qkv = {"method": "gfa", "anchor": "1", "targets": ["query", "key", "value"]}
    metrics = train(config(cache, grid="aligned", **qkv), tmp_path / "gfa", progress=False)
    # LoRA r=1 counts 6 x 32 = 192: GFA's nearest rank is 2 on both grids, 2 x 80 = 160 here (square: 158)
    assert metrics["knobs"] == {"r": 2, "grid": "aligned"} and metrics["adapter_params"] == 160
    assert prepare(config(cache, **qkv)).placement.trainable == 158
    saved = json.loads((tmp_path / "gfa" / "adapter" / "adapter_config.json").read_text())
    assert saved["grid"] == "aligned" and (saved["layout"]["m"], saved["layout"]["k"]) == (48, 32)
    assert prepare(config(cache, grid="aligned", **qkv)).name == f"gfa-1-s0-grid-aligned-lr0.01{GFA_RULE_SUFFIX}"


def test_the_study_levers_reach_the_run_and_name_it(cache, tmp_path, monkeypatch):
    """--scale-rule, --b-lr-ratio, --gradient-init and --module-gain reach the adapter, the optimizer and the
    initialisation."""
    seen = {}

    def spy_optimizer(trainer, ratio):
        optimizer = make_optimizer(trainer, ratio)
        names = {id(parameter): name for name, parameter in trainer.model.named_parameters()}
        seen["rates"] = {names[id(parameter)]: group["lr"] for group in optimizer.param_groups
                         for parameter in group["params"]}
        return optimizer

    def spy_init(tuner, losses, **options):
        seen["init_batches"] = len(list(losses()))
        return init(tuner, losses, **options)

    make_optimizer, init = train_module._optimizer_with_b_rate, train_module.init_from_gradient
    monkeypatch.setattr(train_module, "_optimizer_with_b_rate", spy_optimizer)
    monkeypatch.setattr(train_module, "init_from_gradient", spy_init)
    levers = {"scale_rule": "rsqrt", "b_lr_ratio": 4.0, "gradient_init": 2, "module_gain": True}
    metrics = train(config(cache, method="gfa", anchor="1", **levers), tmp_path / "gfa", progress=False)
    assert math.isfinite(metrics["train_loss"])
    saved = json.loads((tmp_path / "gfa" / "adapter" / "adapter_config.json").read_text())
    assert saved["scale_rule"] == "rsqrt" and saved["module_gain"] is True
    without_gains = prepare(config(cache, method="gfa", anchor="1")).placement
    assert metrics["knobs"] == {**without_gains.knobs, "module_gain": True}
    assert metrics["adapter_params"] == without_gains.trainable + len(saved["layout"]["modules"])
    assert seen["init_batches"] == 2
    rates = seen["rates"]
    assert {rate for name, rate in rates.items() if ".gfa_B." in name} == {4e-2}
    assert {rate for name, rate in rates.items() if ".gfa_B." not in name} == {1e-2}  # A and the head
    assert prepare(config(cache, method="gfa", anchor="1", **levers)).name == \
        "gfa-1-s0-lr0.01-rsqrt-blr4-ginit2-gain"
    assert prepare(config(cache, method="lora", anchor="1", scale_rule="rsqrt")).name == "lora-1-s0-lr0.01-rsqrt"


def test_auto_scale_rule_is_the_methods_own_and_the_record_holds_the_rule_itself(cache, tmp_path, monkeypatch):
    from gfa_peft import GfaConfig
    from gfa_peft.defaults import SCALE_RULES
    from gfa_peft.training import methods
    from gfa_peft.training.config import NAMED_CHOICES

    assert NAMED_CHOICES["scale_rule"] == (methods.AUTO_SCALE_RULE, *SCALE_RULES)  # the flag offers GfaConfig's rules
    assert prepare(config(cache, method="gfa", anchor="1")).scale_rule == GfaConfig(r=1).scale_rule
    assert prepare(config(cache, method="lora", anchor="1")).scale_rule == "constant"
    explicit = config(cache, method="gfa", anchor="1", scale_rule=GfaConfig(r=1).scale_rule)
    train(explicit, tmp_path / "explicit", progress=False)
    auto = prepare(config(cache, method="gfa", anchor="1"))
    assert auto.name == prepare(explicit).name  # the same run (so the same folder), and it resumes:
    assert changed_settings(auto, tmp_path / "explicit") == []
    # GFA's default is GfaConfig's: the day it changes, `gfa train` follows (name, adapter, rate), LoRA does not
    monkeypatch.setattr(methods, "GFA_SCALE_RULE", "rsqrt")
    monkeypatch.setenv("GFA_CACHE", str(tmp_path / "home"))
    flipped = prepare(config(cache, method="gfa", anchor="1", lr=None))
    shipped = json.loads(SHIPPED_LEARNING_RATES.read_text())["minilm"]
    assert flipped.name.endswith("-rsqrt") and flipped.lr == shipped["gfa:rsqrt"]
    assert run_record(flipped)["config"]["scale_rule"] == "rsqrt"
    assert prepare(config(cache, method="lora", anchor="1")).scale_rule == "constant"


def test_a_run_without_a_rate_takes_the_one_tuned_under_its_scale_rule(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("GFA_CACHE", str(tmp_path))  # no saved rates of the user's: the shipped ones
    shipped = json.loads(SHIPPED_LEARNING_RATES.read_text())["minilm"]
    assert shipped["gfa"] != shipped["gfa:rsqrt"]  # else this test could not tell the entries apart
    for rule, entry in (("constant", "gfa"), ("rsqrt", "gfa:rsqrt")):
        assert prepare(config(cache, method="gfa", anchor="1", lr=None, scale_rule=rule)).lr == shipped[entry]
    with pytest.raises(RunConfigError, match="no tuned learning rate for dora with --scale-rule rsqrt"):
        prepare(config(cache, method="dora", anchor="1", lr=None, scale_rule="rsqrt"))


@pytest.mark.parametrize("fields, message", [
    ({"method": "vera", "scale_rule": "rsqrt"}, "--scale-rule is a setting of gfa, lora, dora; vera has none"),
    ({"method": "lorra", "scale_rule": "rsqrt"}, "unknown method 'lorra'; known methods:"),
    ({"method": "lora", "gradient_init": 4}, "--gradient-init is a setting of gfa; lora has none"),
    ({"method": "lora", "grid": "aligned"}, "--grid is a setting of gfa; lora has none"),
    ({"method": "dora", "module_gain": True}, "--module-gain is a setting of gfa; dora has none"),
    ({"method": "gfa", "grid": "aligned", "targets": "all-linear"},
     "the aligned grid needs one input width shared by all target modules, but they have 16, 32"),
    ({"method": "gfa", "b_lr_ratio": 0.0}, "--b-lr-ratio must be positive"),
    ({"method": "vblora", "b_lr_ratio": 2.0}, "--b-lr-ratio is a setting of gfa, lora, dora; vblora has none"),
])
def test_a_study_lever_the_method_lacks_is_refused(cache, fields, message):
    with pytest.raises(RunConfigError, match=re.escape(message)):
        prepare(config(cache, anchor="1", **fields))


def test_full_fine_tuning_changes_only_the_target_weights_and_saves_a_model_to_diff(cache, tmp_path):
    folder = tmp_path / "full"
    metrics = train(config(cache, method="full"), folder, progress=False)
    assert metrics["adapter_params"] == 4 * 16 * 16
    base = AutoModelForSequenceClassification.from_pretrained(cache / "models" / "minilm", num_labels=2).state_dict()
    tuned = AutoModelForSequenceClassification.from_pretrained(folder / "model").state_dict()
    changed = {name for name in base if not name.startswith("classifier") and not torch.equal(base[name], tuned[name])}
    assert changed == {f"bert.encoder.layer.{layer}.attention.self.{name}.weight"
                       for layer in range(2) for name in ("query", "value")}


def test_seeds_reproduce_and_differ(cache, tmp_path):
    first = train(config(cache, method="gfa", anchor="1"), tmp_path / "a", progress=False)
    again = train(config(cache, method="gfa", anchor="1"), tmp_path / "b", progress=False)
    other = train(config(cache, method="gfa", anchor="1", seed=1), tmp_path / "c", progress=False)
    assert first["train_loss"] == again["train_loss"]
    assert first["train_loss"] != other["train_loss"]


# ---------------------------------------------------------------- multiple choice on a causal LM

def test_multiple_choice_run_trains_on_the_gold_answer_and_scores_every_question(cache, tmp_path):
    metrics = train(config(cache, model="smollm2", task="arc_easy", method="gfa", anchor="1"), tmp_path / "mc",
                    progress=False)
    assert metrics["eval_examples"] == 10 and 0 <= metrics["accuracy"] <= 1
    # tiny Llama, q (16x16) and v (8x16) in 2 layers: LoRA r=1 = 2 (32 + 24) = 112 parameters;
    # d = 768, k = 27, m = 29, so GFA takes r = 2 (112 / 56)
    assert metrics["budget"] == 112 and metrics["adapter_params"] == 2 * (29 + 27)


def test_zero_shot_scores_the_untrained_model_and_saves_no_weights(cache, llama_dir, tmp_path):
    folder = tmp_path / "zero"
    # --max-length 3 cuts every training question (9 query tokens), never a scored one
    run = prepare(config(cache, model="smollm2", task="arc_easy", method="zero-shot", lr=None, max_length=3))
    assert run.name == "zero-shot-s0" and (run.steps, run.lr) == (0, 0.0)
    metrics = train(run.config, folder, progress=False)
    assert (metrics["steps"], metrics["train_loss"], metrics["adapter_params"], metrics["trainable_params"]) == (
        0, None, 0, 0)
    assert sorted(path.name for path in folder.iterdir()) == ["config.json", "metrics.json", "train_log.json"]
    assert json.loads((folder / "train_log.json").read_text()) == []
    # the accuracy of the pretrained model's own answers, scored one choice at a time after the whole query
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    test = load_task("arc_easy", cache)[1]["test"]
    right, right_per_char = 0, 0
    for example in test:
        scores = []
        for choice in example["choices"]:
            query = tokenizer(example["query"])["input_ids"]
            answer = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                log_probs = model(input_ids=torch.tensor([query + answer])).logits[0].log_softmax(-1)
            scores.append(sum(log_probs[len(query) + t - 1, token].item() for t, token in enumerate(answer)))
        right += int(np.argmax(scores)) == example["label"]
        # lm-evaluation-harness's acc_norm: over the choice's characters, without the space before it
        per_char = [score / len(choice) for score, choice in zip(scores, example["choices"])]
        right_per_char += int(np.argmax(per_char)) == example["label"]
    assert metrics["accuracy"] == right / test.num_rows

    # Scored per character: each choice's sum over its length in characters; a run of its own name and settings.
    run = prepare(config(cache, model="smollm2", task="arc_easy", method="zero-shot", lr=None, max_length=3,
                         choice_score="per-char"))
    assert run.name == "zero-shot-s0-per-char"
    assert train(run.config, tmp_path / "per-char", progress=False)["accuracy"] == right_per_char / test.num_rows
    assert train_module.changed_settings(run, folder) == ['choice_score: "sum" -> "per-char"']


def test_normalised_choice_scores_divide_by_the_choice_without_its_space():
    sums = [-6.0, -6.0, -10.0]
    choices = [["café", "cafe"], ["sky"]]
    assert choice_scores(sums, choices, "sum") == sums
    assert choice_scores(sums, choices, "per-char") == [-6 / 4, -6 / 4, -10 / 3]
    assert choice_scores(sums, choices, "per-byte") == [-6 / 5, -6 / 4, -10 / 3]  # é is two bytes


def test_a_run_recorded_before_choice_score_existed_counts_as_summed(cache, tmp_path):
    folder = tmp_path / "old"
    train(config(cache, model="smollm2", task="arc_easy", method="zero-shot", lr=None), folder, progress=False)
    record = json.loads((folder / "config.json").read_text())
    del record["config"]["choice_score"]
    (folder / "config.json").write_text(json.dumps(record))
    summed = prepare(config(cache, model="smollm2", task="arc_easy", method="zero-shot", lr=None))
    assert train_module.changed_settings(summed, folder) == []
    # A run recorded before scoring versions existed was scored by version 1: a multiple-choice run differs
    # (its query was cut at --max-length, per-char counted the space); a classification run does not.
    del record["resolved"]["scoring"]
    (folder / "config.json").write_text(json.dumps(record))
    assert train_module.changed_settings(summed, folder) == ["scoring: 1 -> 2"]
    classifier = prepare(config(cache, method="lora", anchor="1"))
    classifier_folder = tmp_path / "classifier"
    classifier_folder.mkdir()
    (classifier_folder / "config.json").write_text(json.dumps(train_module.run_record(classifier)))
    record = json.loads((classifier_folder / "config.json").read_text())
    del record["resolved"]["scoring"]
    (classifier_folder / "config.json").write_text(json.dumps(record))
    assert train_module.changed_settings(classifier, classifier_folder) == []


def test_choice_score_is_refused_on_classification_and_unknown_names(cache):
    with pytest.raises(RunConfigError, match="--choice-score per-char scores the choices of multiple-choice tasks"):
        prepare(config(cache, task="rt", method="lora", anchor="1", choice_score="per-char"))
    with pytest.raises(RunConfigError, match="--choice-score must be 'sum' or 'per-char' or 'per-byte', got 'mean'"):
        prepare(config(cache, model="smollm2", task="arc_easy", method="zero-shot", lr=None, choice_score="mean"))
    # every setting of a fixed set of names is checked alike, for callers that build a RunConfig in Python
    with pytest.raises(RunConfigError, match="--dtype must be 'float32' or 'bfloat16', got 'float16'"):
        prepare(config(cache, task="rt", method="lora", anchor="1", dtype="float16"))
    with pytest.raises(RunConfigError, match="--eval-split must be 'test' or 'dev', got 'train'"):
        prepare(config(cache, task="rt", method="lora", anchor="1", eval_split="train"))


def test_a_mixture_trains_on_the_union_and_scores_each_task_as_if_alone(cache, llama_dir, tmp_path):
    folder = tmp_path / "mixture"
    run = prepare(config(cache, model="smollm2", task="arc_easy+obqa", method="lora", anchor="1"))
    assert run.data["train"].num_rows == 24 + 16
    assert (run.eval_data["task"].count("arc_easy"), run.eval_data["task"].count("obqa")) == (10, 7)
    metrics = train(run.config, folder, progress=False)
    assert list(metrics["by_task"]) == ["arc_easy", "obqa"]
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), folder / "adapter").eval()
    for name, scores in metrics["by_task"].items():
        _, data = load_task(name, cache)
        sequences = choice_sequences(tokenizer, data["test"], max_length=run.max_length)
        predictions = best_choices(sequences, choice_log_likelihoods(model, sequences, tokenizer.pad_token_id,
                                                                     batch_size=4, progress=False))
        labels = list(data["test"]["label"])
        assert scores["accuracy"] == np.mean(np.array(predictions) == np.array(labels))
        assert scores["eval_examples"] == len(labels)
        majority = majority_label(list(data["train"]["label"]))
        assert scores["majority_baseline"] == np.mean(np.array(labels) == majority)
    assert metrics["accuracy"] == pytest.approx(np.mean([scores["accuracy"] for scores in metrics["by_task"].values()]))


def test_subsets_are_taken_from_each_task_of_a_mixture(cache):
    run = prepare(config(cache, model="smollm2", task="arc_easy+obqa", method="lora", anchor="1",
                         max_train_examples=5, max_eval_examples=3))
    assert sorted(run.data["train"]["task"]) == ["arc_easy"] * 5 + ["obqa"] * 5
    assert sorted(run.eval_data["task"]) == ["arc_easy"] * 3 + ["obqa"] * 3
    alone = prepare(config(cache, model="smollm2", task="obqa", method="lora", anchor="1", max_train_examples=5,
                           max_eval_examples=3))
    assert [row for row, task in zip(run.data["train"]["id"], run.data["train"]["task"]) if task == "obqa"] == \
        alone.data["train"]["id"]
    assert [row for row, task in zip(run.eval_data["id"], run.eval_data["task"]) if task == "obqa"] == \
        alone.eval_data["id"]


def test_training_labels_cover_the_answer_only_and_truncation_keeps_it(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    data = Dataset.from_dict({"query": ["the sky is blue and the grass is"], "choices": [["red", "good grass"]],
                              "label": [1]})
    (example,) = encode_choice_training(tokenizer, data, max_length=5)
    answer = tokenizer(" good grass", add_special_tokens=False)["input_ids"]
    assert len(example["input_ids"]) == 5 and example["input_ids"][-2:] == answer
    assert example["labels"] == [IGNORE_INDEX] * 3 + answer
    assert example["input_ids"][:3] == tokenizer("the sky is blue and the grass is")["input_ids"][-3:]


def test_batched_choice_scores_equal_one_sequence_at_a_time(llama_dir):
    """Padding, batching and length sorting must not change a choice's summed log-likelihood."""
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    data = Dataset.from_dict({"query": ["what colour is the sky ?", "the film was"],
                              "choices": [["blue", "the grass is red", "fun"], ["good", "dull and boring"]],
                              "label": [0, 1]})
    sequences = choice_sequences(tokenizer, data, max_length=32)
    batched = choice_log_likelihoods(model, sequences, tokenizer.pad_token_id, batch_size=4, progress=False)
    for sequence, score in zip(sequences, batched, strict=True):
        ids = torch.tensor([sequence.input_ids])
        with torch.no_grad():
            log_probs = model(input_ids=ids).logits[0].log_softmax(-1)
        start = len(sequence.input_ids) - sequence.choice_length
        expected = sum(log_probs[t - 1, sequence.input_ids[t]].item() for t in range(start, len(sequence.input_ids)))
        assert score == pytest.approx(expected, abs=1e-4)
    assert best_choices(sequences, batched) == [
        int(np.argmax(batched[0:3])), int(np.argmax(batched[3:5]))]


# ---------------------------------------------------------------- metrics against independent references

@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=2, max_size=40))
def test_binary_matthews_is_the_pearson_correlation_of_the_labels(pairs):
    predictions, labels = zip(*pairs)
    if len(set(predictions)) < 2 or len(set(labels)) < 2:
        assert matthews(predictions, labels) == 0.0
    else:
        assert matthews(predictions, labels) == pytest.approx(np.corrcoef(predictions, labels)[0, 1])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=2, max_size=40))
def test_multiclass_matthews_is_the_covariance_of_one_hot_codes(pairs):
    """Gorodkin's R_K: cov(X, Y) / sqrt(cov(X, X) cov(Y, Y)) with cov summed over the one-hot columns."""
    predictions, labels = (np.eye(4)[list(column)] for column in zip(*pairs))

    def cov(a, b):
        return ((a - a.mean(0)) * (b - b.mean(0))).sum()

    denominator = math.sqrt(cov(predictions, predictions) * cov(labels, labels))
    expected = cov(predictions, labels) / denominator if denominator else 0.0
    assert matthews(*zip(*pairs)) == pytest.approx(expected)


def test_f1_and_majority_by_hand():
    # TP = 2, FP = 1, FN = 1: F1 = 4 / (4 + 1 + 1)
    assert f1_positive([1, 1, 1, 0, 0], [1, 1, 0, 1, 0]) == pytest.approx(4 / 6)
    assert majority_label([2, 0, 2, 0, 1]) == 0


# ---------------------------------------------------------------- bad input: exit 2, nothing written

def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.fixture
def user_files(tmp_path) -> dict[str, Path]:
    rows = [f"{row['text']},{row['label']}" for row in sentiment_rows(20, 5)]
    return {
        "good": write_csv(tmp_path / "good.csv", "text,label", rows),
        "no_label": write_csv(tmp_path / "no_label.csv", "text,score", rows),
        "unseen": write_csv(tmp_path / "unseen.csv", "text,label", ["good fun,2"]),
    }


@pytest.mark.parametrize("arguments, message", [
    (["--task", "nope"], "unknown task 'nope'"),
    (["--task", "rt", "--model", "nope"], "model 'nope' is not one of"),
    (["--task", "rt", "--method", "adalora", "--anchor", "1"], "unknown method 'adalora'"),
    (["--task", "rt", "--method", "lora", "--anchor", "1/2"], "lora cannot reach anchor 1/2"),
    (["--task", "rt", "--method", "vera", "--anchor", "1/2"], "vera cannot reach anchor 1/2"),
    (["--task", "rt", "--method", "gfa", "--anchor", "64"], "out of range"),
    (["--task", "rt", "--method", "gfa", "--anchor", "half"], "is not '1/2' or a positive integer"),
    (["--task", "rt", "--method", "gfa"], "needs exactly one of an anchor or a rank"),
    (["--task", "rt", "--method", "vblora", "--rank", "4"], "no rank to set"),
    (["--task", "rt", "--method", "full", "--anchor", "4"], "give no anchor or rank"),
    (["--task", "arc_easy", "--model", "smollm2", "--method", "zero-shot", "--anchor", "4"], "trains nothing: give no"),
    (["--task", "rt", "--method", "zero-shot"], "'rt' is a classification task"),
    (["--task", "arc_easy+rt", "--model", "smollm2", "--anchor", "1"], "rt is a classification task"),
    (["--task", "arc_easy+arc_easy", "--model", "smollm2", "--anchor", "1"], "names arc_easy more than once"),
    (["--task", "arc_easy+", "--model", "smollm2", "--anchor", "1"], "joins two or more task names"),
    (["--task", "arc_easy+nope", "--model", "smollm2", "--anchor", "1"], "unknown task 'nope'"),
    (["--task", "arc_easy", "--model", "smollm2", "--anchor", "1", "--max-train-examples", "0"],
     "--max-train-examples must be positive"),
    (["--task", "rt", "--method", "lora", "--anchor", "1", "--module-order", "3"], "--module-order is a setting of gfa; lora has none"),
    (["--task", "rt", "--method", "gfa", "--anchor", "1", "--module-order", "random"], "module_order must be"),
    (["--task", "rt", "--anchor", "1", "--steps", "5", "--epochs", "1"], "not both"),
    (["--task", "rt", "--anchor", "1", "--eval-task", "sst2"], "must not be tested on 'sst2'"),
    (["--task", "sst2", "--anchor", "1"], "has no training split"),
    (["--task", "arc_easy", "--anchor", "1"], "scored by a causal LM"),
    (["--train-file", "{no_label}", "--anchor", "1"], r"lacks column\(s\) label"),
    (["--train-file", "{good}", "--eval-file", "{unseen}", "--anchor", "1"], "labels that .* never uses: 2"),
    (["--task", "rt", "--train-file", "{good}", "--anchor", "1"], "not both or neither"),
])
def test_bad_input_exits_2_before_anything_is_written(cache, tmp_path, user_files, capsys, arguments, message):
    runs = tmp_path / "runs"
    arguments = [argument.format(**user_files) for argument in arguments]
    code = main(["train", *arguments, "--lr", "0.01", "--steps", "2", "--cache", str(cache), "--runs", str(runs)]
                if "--epochs" not in arguments else
                ["train", *arguments, "--lr", "0.01", "--cache", str(cache), "--runs", str(runs)])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not runs.exists()


def test_a_finished_run_is_not_overwritten_without_asking(cache, tmp_path, capsys):
    arguments = ["train", "--task", "rt", "--anchor", "1", "--lr", "0.01", "--steps", "2", "--cache", str(cache),
                 "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(arguments) == 0
    before = (tmp_path / "run" / "metrics.json").read_text()
    assert main(arguments) == 2 and "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "run" / "metrics.json").read_text() == before
    assert main([*arguments, "--overwrite"]) == 0


def test_an_interrupted_run_leaves_nothing_and_is_redone(cache, tmp_path, monkeypatch):
    folder = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_predict", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(config(cache, anchor="1"), folder, progress=False)
    assert not is_finished(folder) and list(tmp_path.iterdir()) == []  # built aside, never published
    monkeypatch.undo()
    train(config(cache, anchor="1"), folder, progress=False)
    assert is_finished(folder)


def test_a_run_without_lr_takes_its_anchors_tuned_rate(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("GFA_CACHE", str(tmp_path))  # no user rates here
    from gfa_peft.training import recipes

    shipped = tmp_path / "shipped.json"
    shipped.write_text(json.dumps({"minilm": {rate_entry("gfa", GFA_SCALE_RULE): {"*": 0.01, "16": 0.003}}}))
    monkeypatch.setattr(recipes, "SHIPPED_LEARNING_RATES", shipped)
    rates = {anchor: prepare(config(cache, lr=None, anchor=anchor)).lr for anchor in ("1", "16")}
    assert rates == {"1": 0.01, "16": 0.003}
    assert prepare(config(cache, lr=None, anchor=None, rank=2)).lr == 0.01
    assert prepare(config(cache, lr=5e-4, anchor="16")).lr == 5e-4


def test_prepare_errors_are_run_config_errors(cache):
    with pytest.raises(RunConfigError) as raised:
        prepare(config(cache, method="dora", anchor="1/2"))
    assert raised.value.unreachable
    with pytest.raises(RunConfigError) as raised:
        prepare(config(cache, task="nope", anchor="1"))
    assert not raised.value.unreachable


# ---------------------------------------------------------------- the real bundled model (slow)

@pytest.mark.slow
def test_real_minilm_gfa_at_half_beats_the_majority_class_on_trec6(tmp_path):
    try:
        run = prepare(RunConfig(model="minilm", task="trec6", method="gfa", anchor="1/2"))
    except RunConfigError as error:
        pytest.skip(f"bundled assets not installed: {error}")
    metrics = train_module.execute(run, tmp_path / "run", progress=False)
    assert metrics["adapter_params"] == 2_661  # r = 1 on MiniLM q+v: m + k = 1,331 + 1,330 (docs/budget.md)
    assert metrics["accuracy"] > metrics["majority_baseline"] + 0.3


class Recorder(logging.Handler):
    """Keeps every record that reaches it."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_cli_run_hides_load_reports_and_harmless_warnings_unless_verbose(cache, tmp_path, capsys):
    recorder = Recorder()
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(recorder)
    level_before = transformers_logger.level
    arguments = ["train", "--task", "rt", "--anchor", "1", "--lr", "0.01", "--steps", "1", "--cache", str(cache),
                 "--no-progress"]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main([*arguments, "--out", str(tmp_path / "quiet")]) == 0
        assert not any("LOAD REPORT" in message for message in recorder.messages)
        assert not [warning for warning in caught if issubclass(warning.category, FutureWarning)]
        printed = capsys.readouterr()
        assert "'train_runtime'" not in printed.out  # --no-progress: no Trainer log lines either
        assert "Loading weights" not in printed.err  # nor transformers' loading bar
        assert main([*arguments, "--out", str(tmp_path / "verbose"), "--verbose"]) == 0
        assert any("LOAD REPORT" in message for message in recorder.messages)
    finally:
        transformers_logger.removeHandler(recorder)
    assert transformers_logger.level == level_before  # the library's logging is the caller's again
