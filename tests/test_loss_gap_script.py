"""scripts/loss_gap.py, the window-by-window evidence of docs/study.md's "speed or capacity" section, against hand
computations on two small training logs."""

from __future__ import annotations

import json
import sys

import pytest

from script_modules import load_script


def write_log(folder, losses, every=10, steps_per_epoch=40):
    folder.mkdir()
    log = [{"step": every * (index + 1), "loss": loss, "epoch": every * (index + 1) / steps_per_epoch,
            "learning_rate": 1e-3} for index, loss in enumerate(losses)]
    log.append({"step": every * len(losses), "train_runtime": 1.0})  # the Trainer's closing entry has no loss
    (folder / "train_log.json").write_text(json.dumps(log))
    return folder


def test_each_window_averages_its_logged_steps_and_ends_at_the_last_one(tmp_path, monkeypatch, capsys):
    first = write_log(tmp_path / "a", [4.0, 3.0, 2.0, 2.0, 1.0, 1.0, 0.5])  # steps 10 .. 70
    second = write_log(tmp_path / "b", [3.0, 3.0, 3.0, 1.0, 1.0, 1.0, 1.5])
    script = load_script("loss_gap")
    rows = script.windows(script.logged_losses(first), script.logged_losses(second), window=30)
    assert [row["steps"] for row in rows] == [(0, 30), (30, 60), (60, 70)]
    assert [row["a"] for row in rows] == pytest.approx([3.0, 4 / 3, 0.5])
    assert [row["gap"] for row in rows] == pytest.approx([0.0, 1 / 3, -1.0])
    assert [row["epoch"] for row in rows] == pytest.approx([0.75, 1.5, 1.75])

    monkeypatch.setattr(sys, "argv", ["loss_gap.py", str(first), str(second), "--window", "30"])
    script.main()
    assert "61-70  0.500  1.500  -1.000   1.75" in capsys.readouterr().out


def test_runs_logging_different_steps_are_refused(tmp_path):
    script = load_script("loss_gap")
    first = script.logged_losses(write_log(tmp_path / "a", [1.0, 1.0]))
    second = script.logged_losses(write_log(tmp_path / "b", [1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="log different steps"):
        script.windows(first, second, window=10)
