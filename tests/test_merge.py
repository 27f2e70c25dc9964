"""`gfa merge` streams an adapter into a sharded checkpoint; plain transformers then reproduces the adapter."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from gfa_peft import GfaConfig
from gfa_peft.adapters.merge import MERGED
from gfa_peft.cli import main
from gfa_peft.data.tasks import load_task
from gfa_peft.training.run import RunConfig, train
from toy_models import tiny_gpt2, tiny_llama, token_batch

CASES = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"], {}),
    # Conv1D stores (in, out); c_proj's weights are square, so only the module type tells the orientation.
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj"], {}),
    # a learned gain per module, which the merge applies to each module's slice
    "llama-gain": (tiny_llama, ["q_proj", "v_proj", "down_proj"], {"module_gain": True}),
}


def trained_adapter(build, targets, config=None):
    torch.manual_seed(0)
    model = get_peft_model(build(), GfaConfig(r=2, target_modules=targets, **(config or {})))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for seed in range(3):
        ids = token_batch(seed)["input_ids"]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tmp_path_factory):
    """A base checkpoint in several shards, an adapter trained on it, and the adapted model's logits."""
    build, targets, config = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    build().save_pretrained(folder / "base", max_shard_size="20KB")
    model = trained_adapter(build, targets, config)
    model.save_pretrained(folder / "adapter")
    ids = token_batch(7)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return folder, ids, logits


def test_merged_shards_load_with_plain_transformers_and_give_the_adapted_outputs(saved, capsys):
    folder, ids, adapted_logits = saved
    base, out = folder / "base", folder / "merged"
    shards = [name for name in os.listdir(base) if name.endswith(".safetensors")]
    assert len(shards) > 2

    assert main(["merge", str(folder / "adapter"), "--base", str(base), "--out", str(out), "--no-progress",
                 "--json", "-"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards"] == len(shards) and summary["merged_modules"] > 0
    assert sorted(os.listdir(out)) == sorted([*os.listdir(base), MERGED.manifest])  # and the list of its files

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        merged_logits, base_logits = merged(input_ids=ids).logits, plain(input_ids=ids).logits
    assert (adapted_logits - base_logits).abs().max() > 1e-3  # the adapter changes something to check
    torch.testing.assert_close(merged_logits, adapted_logits, rtol=1e-5, atol=1e-5)


def test_adapter_that_does_not_fit_the_checkpoint_exits_2_and_writes_nothing(tmp_path, capsys):
    torch.manual_seed(0)
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    trained_adapter(tiny_llama, ["q_proj"]).save_pretrained(tmp_path / "llama_adapter")
    out = tmp_path / "merged"
    code = main(["merge", str(tmp_path / "llama_adapter"), "--base", str(tmp_path / "gpt2"), "--out", str(out)])
    assert code == 2
    error = capsys.readouterr().err
    assert "adapter module 'model.layers.0.self_attn.q_proj' is not a module of the base model" in error
    assert sorted(os.listdir(tmp_path)) == ["gpt2", "llama_adapter"]


def test_adapter_whose_shapes_differ_from_the_checkpoint_exits_2(tmp_path, capsys):
    wide = tiny_llama()
    wide.config.intermediate_size = 64
    AutoModelForCausalLM.from_config(wide.config).save_pretrained(tmp_path / "wide")
    trained_adapter(tiny_llama, ["down_proj"]).save_pretrained(tmp_path / "adapter")
    code = main(["merge", str(tmp_path / "adapter"), "--base", str(tmp_path / "wide"), "--out", str(tmp_path / "m")])
    assert code == 2
    assert "update shape [32, 48] in the adapter but [32, 64] in the base model" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]


def test_existing_output_is_kept_unless_overwrite(saved, tmp_path, capsys):
    folder, _, _ = saved
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    arguments = ["merge", str(folder / "adapter"), "--base", str(folder / "base"), "--out", str(out), "--no-progress"]
    for extra in ([], ["--overwrite"]):  # a folder of other files is never replaced
        assert main([*arguments, *extra]) == 2 and "is not a merged model folder" in capsys.readouterr().err
        assert os.listdir(out) == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert main(arguments) == 0
    assert main(arguments) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert main([*arguments, "--overwrite"]) == 0
    assert "config.json" in os.listdir(out)
    assert capsys.readouterr().out.startswith("merged ")  # without --json: a readable summary, not JSON


@pytest.fixture(scope="module")
def classifier_run(cache, tmp_path_factory):
    """A `gfa train` run of GFA on the tiny MiniLM (a bare `BertModel` checkpoint) and rt, and its metrics."""
    folder = tmp_path_factory.mktemp("classifier") / "run"
    metrics = train(RunConfig(task="rt", steps=3, lr=1e-2, cache=str(cache), method="gfa", anchor="1/2"), folder,
                    progress=False)
    return folder, metrics


@pytest.mark.parametrize("shards", ["one", "several"])
def test_a_classifier_run_merges_into_its_bare_encoder_and_scores_as_the_run_did(cache, classifier_run, shards,
                                                                                  tmp_path, capsys):
    run, metrics = classifier_run
    base = cache / "models" / "minilm"
    if shards == "several":  # the same encoder, sharded: the index gains the head and the classifier's names
        AutoModel.from_pretrained(base).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
        base = tmp_path / "sharded"
        assert len(list(base.glob("*.safetensors"))) > 1
    out = tmp_path / "merged"
    assert main(["merge", str(run / "adapter"), "--base", str(base), "--out", str(out), "--no-progress",
                 "--json", "-"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["architecture"] == "BertForSequenceClassification"
    assert summary["added_tensors"] == ["classifier.bias", "classifier.weight"]

    merged, loading = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]  # every tensor under its own name
    on_base = AutoModelForSequenceClassification.from_pretrained(cache / "models" / "minilm", num_labels=2)
    adapted = PeftModel.from_pretrained(on_base, run / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(cache / "models" / "minilm")
    _, data = load_task("rt", cache)
    batch = tokenizer(list(data["test"]["text"]), padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = merged.eval()(**batch).logits
        torch.testing.assert_close(logits, adapted.eval()(**batch).logits, rtol=1e-5, atol=1e-6)
    labels = data["test"]["label"]
    correct = sum(int(prediction == label) for prediction, label in zip(logits.argmax(-1).tolist(), labels))
    assert correct / len(labels) == metrics["accuracy"]
