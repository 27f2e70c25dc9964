"""scripts/compare_sweeps.py, the shipping rule of docs/study.md, against hand computations on two small summaries."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from script_modules import SCRIPTS, load_script

SCRIPT = SCRIPTS / "compare_sweeps.py"


def cell(task, method, anchor, mean, std=1.0, n=3):
    return {"task": task, "method": method, "anchor": anchor, "mean": mean, "std": std, "n": n,
            "module_order": None}


def summary(cells, unfinished=()):
    return {"cells": list(cells), "unfinished": list(unfinished)}


def write_sweep(folder: Path, cells) -> Path:
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(summary(cells)))
    return folder


NEW = [cell("a", "gfa", "1", 60.0), cell("b", "gfa", "1", 70.0), cell("a", "gfa", "16", 64.0),
       cell("b", "gfa", "16", 71.0, std=3.0), cell("a", "lora", "1", 61.0)]
OLD = [cell("a", "gfa", "1", 57.0), cell("b", "gfa", "1", 70.5), cell("a", "gfa", "16", 63.0),
       cell("b", "gfa", "16", 71.5)]


def test_cells_anchors_and_the_rule_match_hand_computations():
    script = load_script("compare_sweeps")
    result = script.compare(summary(NEW), summary(OLD), "gfa")
    # pooled over all nine cells, 2 degrees of freedom each: one std of 3, eight of 1
    band = 2 * math.sqrt((8 * 1.0 + 9.0) / 9)
    assert result["tie_band"]["band_pp"] == pytest.approx(band)
    by_cell = {(row["task"], row["anchor"]): (row["gap_pp"], row["verdict"]) for row in result["cells"]}
    assert by_cell == {("a", "1"): (pytest.approx(3.0), "win"), ("b", "1"): (pytest.approx(-0.5), "tie"),
                       ("a", "16"): (pytest.approx(1.0), "tie"), ("b", "16"): (pytest.approx(-0.5), "tie")}
    assert [(row["anchor"], row["gap_pp"]) for row in result["anchors"]] == [
        ("1", pytest.approx(1.25)), ("16", pytest.approx(0.25))]
    assert result["passes"]


def test_a_lower_mean_at_one_anchor_or_one_lost_cell_fails_the_rule():
    script = load_script("compare_sweeps")
    lower_at_16 = [*OLD[:3], cell("b", "gfa", "16", 73.0)]  # the mean at 16: 67.5 new against 68.0 old
    assert not script.compare(summary(NEW), summary(lower_at_16), "gfa")["passes"]
    new = [cell("a", "gfa", "1", 30.0), cell("b", "gfa", "1", 70.0)]
    old = [cell("a", "gfa", "1", 40.0), cell("b", "gfa", "1", 50.0)]  # the mean is higher, but (a, 1) is lost
    result = script.compare(summary(new), summary(old), "gfa")
    assert [row["verdict"] for row in result["cells"]] == ["loss", "win"]
    assert result["anchors"][0]["gap_pp"] == pytest.approx(5.0) and not result["passes"]


def test_the_rule_waits_for_a_like_for_like_comparison():
    script = load_script("compare_sweeps")
    cases = {
        "not run by the new setting: b at 16": summary(NEW[:3]),
        "b at 16: 2 seed(s) new, 3 old": summary([*NEW[:3], cell("b", "gfa", "16", 71.0, n=2)]),
        "1 run(s) of the new folder unfinished": summary(NEW, unfinished=["a/gfa-16-s2"]),
    }
    for reason, new in cases.items():
        result = script.compare(new, summary(OLD), "gfa")
        assert result["incomplete"] == [reason] and not result["passes"]
    # another module order's cell (the permutation diagnostic) is not a second verdict of the same cell
    reordered = script.compare(summary([*NEW, {**NEW[0], "module_order": "by_name", "mean": 10.0}]), summary(OLD), "gfa")
    assert len(reordered["cells"]) == 4 and reordered["passes"]
    with pytest.raises(SystemExit, match="the old folder has gfa at anchor 1 on a more than once"):
        script.compare(summary(NEW), summary([*OLD, {**OLD[0], "lr": 0.03}]), "gfa")


def test_command_line_prints_the_tables_and_refuses_a_folder_without_results(tmp_path, monkeypatch, capsys):
    new, old = write_sweep(tmp_path / "new", NEW), write_sweep(tmp_path / "old", OLD)
    shown = subprocess.run([sys.executable, str(SCRIPT), str(new), str(old)], capture_output=True, text=True,
                           check=True).stdout
    assert shown.startswith("gfa, new against old") and "the new setting passes" in shown
    assert ["a", "1", "60.0", "57.0", "+3.0", "win"] in [line.split() for line in shown.splitlines()]
    script = load_script("compare_sweeps")
    monkeypatch.setattr(sys, "argv", ["compare_sweeps.py", str(new), str(old), "--json"])
    script.main()
    as_json = json.loads(capsys.readouterr().out)
    assert as_json["passes"] and len(as_json["cells"]) == 4
    monkeypatch.setattr(sys, "argv", ["compare_sweeps.py", str(tmp_path), str(old)])
    with pytest.raises(SystemExit, match="holds no results.json"):
        script.main()
