"""scripts/score_adapters.py, siqa's per-question evidence in docs/study.md: a saved adapter scored again on its
run's evaluation split gives the run's own accuracy."""

from __future__ import annotations

import json
import sys

import pytest

from gfa_peft.training.run import RunConfig, train
from script_modules import load_script


@pytest.mark.parametrize("fields", [
    {"method": "gfa", "anchor": "1"},
    {"method": "lora", "anchor": "1", "dtype": "bfloat16"},  # scored under the run's own bf16 autocast
    # the record's rate dropped: scoring must not ask today's table for DoRA's rate under rsqrt (it has none)
    {"method": "dora", "anchor": "1", "scale_rule": "rsqrt", "forget_lr": True},
], ids=["gfa", "lora-bf16", "dora-rsqrt-no-rate"])
def test_an_adapter_rescored_gives_its_runs_accuracy(cache, tmp_path, monkeypatch, capsys, fields):
    forget_lr = fields.pop("forget_lr", False)
    folder = tmp_path / "run"
    metrics = train(RunConfig(task="rt", steps=3, lr=1e-2, cache=str(cache), **fields), folder, progress=False)
    if forget_lr:
        record = json.loads((folder / "config.json").read_text())
        record["config"]["lr"] = None
        (folder / "config.json").write_text(json.dumps(record))
    monkeypatch.setattr(sys, "argv", ["score_adapters.py", str(folder), str(folder / "adapter"), "--per-question"])
    load_script("score_adapters").main()
    scored = json.loads(capsys.readouterr().out)
    assert scored["accuracy"] == metrics["accuracy"]
    assert len(scored["questions"]) == metrics["eval_examples"]
