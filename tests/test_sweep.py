"""`gfa sweep`, `gfa tune` and `gfa demo` on tiny models, and the summary arithmetic against hand computations."""

from __future__ import annotations

import csv
import json
import statistics
import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from gfa_peft.cli import main
from gfa_peft.defaults import LR_CHOICE_RULES
from gfa_peft.io.files import folder_lock
from gfa_peft.training import methods
from gfa_peft.training import sweep as sweep_module
from gfa_peft.training.methods import scale_rule_of
from gfa_peft.training.recipes import SHIPPED_LEARNING_RATES
from gfa_peft.training.sweep import (
    PAPER_TIE_BAND,
    SweepSpec,
    choose_learning_rates,
    format_summary,
    retention,
    run_sweep,
    summarize,
    tie_band,
    verdicts,
)
from gfa_peft.training.run import RunConfigError, is_finished
from references import GFA_RULE_SUFFIX


pytestmark = pytest.mark.usefixtures("one_thread")


def spec(cache: Path, **fields) -> SweepSpec:
    return SweepSpec(**{"model": "minilm", "tasks": ("rt",), "methods": ("gfa", "lora"), "anchors": ("1/2", "1"),
                        "seeds": (0, 1), "learning_rates": (1e-2,), "settings": {"steps": 2, "cache": str(cache)},
                        **fields})


# ---------------------------------------------------------------- running, skipping, resuming

def test_cells_carry_the_seeds_mean_final_training_loss(cache, tmp_path):
    """A cell's final loss: each seed's mean of its last five logged losses (one log every 10 steps), averaged."""
    root = tmp_path / "sweep"
    summary = run_sweep(spec(cache, methods=("gfa",), anchors=("1",), settings={"steps": 70, "cache": str(cache)}),
                        root, progress=False, log=lambda message: None)
    (cell,) = summary["cells"]
    finals = []
    for seed in (0, 1):
        log = json.loads((root / "rt" / f"gfa-1-s{seed}-lr0.01{GFA_RULE_SUFFIX}" / "train_log.json").read_text())
        losses = [entry["loss"] for entry in log if "loss" in entry]
        assert len(losses) == 7
        finals.append(statistics.fmean(losses[-5:]))
    assert cell["final_loss"] == pytest.approx(statistics.fmean(finals), rel=1e-12)
    with (root / "results.csv").open() as file:
        (row,) = csv.DictReader(file)
    assert float(row["final_loss"]) == pytest.approx(cell["final_loss"], abs=5e-5)


def test_sweep_runs_the_grid_skips_finished_runs_and_redoes_unfinished_ones(cache, tmp_path, monkeypatch):
    root = tmp_path / "sweep"
    summary = run_sweep(spec(cache), root, progress=False, log=lambda message: None)
    folders = sorted(path.relative_to(root).as_posix() for path in root.glob("rt/*"))
    # LoRA cannot reach 1/2: gfa at 1/2 and 1, lora at 1, two seeds each
    named = (("gfa-1", GFA_RULE_SUFFIX), ("gfa-1_2", GFA_RULE_SUFFIX), ("lora-1", ""))  # a GFA run names its rule
    assert folders == [f"rt/{name}-s{seed}-lr0.01{rule}" for name, rule in named for seed in (0, 1)]
    assert all(is_finished(root / folder) for folder in folders)
    for name in ("results.json", "results.csv", "accuracy_vs_params.png", "sweep.json"):
        assert (root / name).stat().st_size > 0
    assert json.loads((root / "results.json").read_text())["cells"] == summary["cells"]
    with (root / "results.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(row["method"], row["anchor"], row["n"]) for row in rows] == [("gfa", "1/2", "2"), ("gfa", "1", "2"),
                                                                          ("lora", "1", "2")]
    assert {cell["anchor"]: cell["adapter_params"] for cell in summary["cells"] if cell["method"] == "gfa"} == {
        "1/2": 64, "1": 128}

    trained = []
    monkeypatch.setattr(sweep_module, "execute", lambda run, folder, progress: trained.append(folder.name))
    run_sweep(spec(cache), root, progress=False, log=lambda message: None)
    assert trained == []  # everything finished: nothing is trained again

    (root / "rt" / "lora-1-s1-lr0.01" / "metrics.json").unlink()  # as if interrupted before its metrics
    monkeypatch.undo()
    counted = []
    original = sweep_module.execute
    monkeypatch.setattr(sweep_module, "execute", lambda *args: counted.append(args[1].name) or original(*args))
    run_sweep(spec(cache), root, progress=False, log=lambda message: None)
    assert counted == ["lora-1-s1-lr0.01"]


def test_a_bad_run_anywhere_in_the_grid_stops_the_sweep_before_any_training(cache, tmp_path):
    with pytest.raises(RunConfigError, match="unknown task 'nope'"):
        run_sweep(spec(cache, tasks=("rt", "nope")), tmp_path / "sweep", progress=False)
    assert not (tmp_path / "sweep").exists()


def test_sweep_command_bad_input_exits_2_and_writes_nothing(cache, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", "--methods", "gfa,adalora", "--lrs", "0.01", "--cache", str(cache), "--out", str(out),
                 "--steps", "1"])
    assert code == 2 and "unknown method 'adalora'" in capsys.readouterr().err
    assert not out.exists()


def test_tune_picks_each_methods_best_dev_rate(cache, tmp_path, capsys):
    out = tmp_path / "tune"
    code = main(["tune", "--methods", "gfa,lora", "--anchors", "1", "--lrs", "0.001,0.01", "--steps", "2",
                 "--cache", str(cache), "--out", str(out), "--no-progress"])
    assert code == 0
    record = json.loads((out / "lr_choice.json").read_text())
    results = [json.loads(path.read_text()) for path in out.glob("rt/*/metrics.json")]
    assert len(results) == 4 and {result["eval_split"] for result in results} == {"dev"}
    for method in ("gfa", "lora"):
        accuracy = {result["lr"]: result["accuracy"] for result in results if result["method"] == method}
        best = max(sorted(accuracy), key=lambda lr: accuracy[lr])  # ties to the smaller rate
        assert record["choices"][method]["lr"] == best
    printed = capsys.readouterr().out
    assert "chosen" in printed
    for method in ("gfa", "lora"):  # of two rates, the chosen one is always at an edge
        assert re.search(rf"{method}: 0\.0?01 is the (largest|smallest) rate tried", printed)
    # Extending the grid with another rate into the same folder: the choice is made from every rate tried there.
    assert main(["tune", "--methods", "gfa,lora", "--anchors", "1", "--lrs", "0.03", "--steps", "2",
                 "--cache", str(cache), "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "lr_choice.json").read_text())
    assert all(list(record["choices"][method]["mean_by_lr"]) == ["0.001", "0.01", "0.03"] for method in ("gfa", "lora"))


def test_tune_per_anchor_by_loss_saves_a_rate_for_each_anchor(cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GFA_CACHE", str(tmp_path / "home"))  # where the saved rates go (the assets: --cache)
    out = tmp_path / "tune"
    code = main(["tune", "--methods", "lora", "--anchors", "1,4", "--lrs", "0.001,0.03", "--steps", "12",
                 "--per-anchor", "--choose-by", "loss", "--save-defaults", "--cache", str(cache), "--out", str(out),
                 "--no-progress"])
    assert code == 0
    record = json.loads((out / "lr_choice.json").read_text())
    assert record["rule"]["choose_by"] == "loss" and record["rule"]["per_anchor"]
    cells = json.loads((out / "results.json").read_text())["cells"]
    chosen = record["choices"]["lora"]["lr"]
    assert set(chosen) == {"1", "4"} and len(cells) == 4
    band = record["rule"]["tie_band_pp"]
    for anchor in ("1", "4"):
        here = {cell["lr"]: cell for cell in cells if cell["anchor"] == anchor}
        best_dev = max(cell["mean"] for cell in here.values())
        fitting = [lr for lr, cell in here.items() if cell["mean"] >= best_dev - band]
        assert chosen[anchor] == min(fitting, key=lambda lr: (here[lr]["final_loss"], lr))
    printed = capsys.readouterr().out
    assert "chosen at" in printed and "saved lora as the minilm recipe's defaults" in printed
    assert json.loads((tmp_path / "home" / "default_lrs.json").read_text())["minilm"]["lora"] == chosen
    from gfa_peft.training.recipes import learning_rates

    assert learning_rates()["minilm"]["lora"] == {"*": 0.003, **chosen}  # the shipped rate serves the other anchors


def test_tune_under_a_scale_rule_saves_the_rules_own_rates(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("GFA_CACHE", str(tmp_path / "home"))
    out = tmp_path / "tune"
    assert main(["tune", "--methods", "gfa,vera", "--anchors", "1", "--lrs", "0.001,0.03", "--steps", "12",
                 "--scale-rule", "rsqrt", "--save-defaults", "--cache", str(cache), "--out", str(out),
                 "--no-progress"]) == 0
    choices = json.loads((out / "lr_choice.json").read_text())["choices"]
    saved = json.loads((tmp_path / "home" / "default_lrs.json").read_text())["minilm"]
    # VeRA has no scale rule, so it ran (and is saved) as itself; GFA's choice is a rate for its rsqrt runs only
    assert saved == {"gfa:rsqrt": choices["gfa"]["lr"], "vera": choices["vera"]["lr"]}
    from gfa_peft.training.recipes import default_learning_rate, learning_rates

    assert default_learning_rate("minilm", "gfa", "1", "rsqrt") == choices["gfa"]["lr"]
    assert learning_rates()["minilm"]["gfa"] == json.loads(SHIPPED_LEARNING_RATES.read_text())["minilm"]["gfa"]
    # a later command tuning LoRA into the same folder pools GFA's trials but saves only its own method
    assert main(["tune", "--methods", "lora", "--anchors", "1", "--lrs", "0.001,0.03", "--steps", "12",
                 "--save-defaults", "--cache", str(cache), "--out", str(out), "--no-progress"]) == 0
    pooled = json.loads((out / "lr_choice.json").read_text())["choices"]
    assert set(pooled) == {"gfa", "vera", "lora"}
    assert json.loads((tmp_path / "home" / "default_lrs.json").read_text())["minilm"] == {**saved, "lora": pooled["lora"]["lr"]}


def test_demo_prints_the_table_and_the_figure(cache, tmp_path, capsys, monkeypatch):
    from gfa_peft.cli import demo

    monkeypatch.setitem(demo.DEMO, "settings", {"steps": 2})
    assert main(["demo", "--cache", str(cache), "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"figure: {tmp_path / 'demo' / 'accuracy_vs_params.png'}" in printed
    assert "majority-class baseline: rt" in printed and "tie band: +/-1.40pp" in printed
    # Explained for a reader who never read the paper: the anchors, 1/2, the band's source, retention.
    assert "the paper's" in printed and "the README's +/-3.2pp is 2 x the pooled seed std of its 3-seed sweep" in printed
    legend = printed[printed.index("How to read this:"):]
    assert all(term in legend for term in ("- anchor:", "- 1/2: a budget of about 0.3 x LoRA r=1",
                                           "reached here by gfa.",
                                           "- tie band:", "- retention:"))
    lines = printed.splitlines()
    header = next(index for index, line in enumerate(lines) if line.split()[:3] == ["task", "method", "anchor"])
    methods = [line.split()[1] for line in lines[header + 1:header + 11]]
    assert methods == ["gfa"] * 4 + ["lora"] * 3 + ["dora"] * 3  # GFA first, not alphabetical
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert sorted((cell["method"], cell["anchor"]) for cell in results["cells"]) == sorted(
        [("gfa", "1/2"), ("gfa", "1"), ("gfa", "4"), ("gfa", "16"), ("lora", "1"), ("lora", "4"), ("lora", "16"),
         ("dora", "1"), ("dora", "4"), ("dora", "16")])


# ---------------------------------------------------------------- the summary's arithmetic, by hand

def result(task, method, anchor, seed, accuracy, params=100, lr=0.01, baseline=0.5, order=None):
    knobs = {"r": 1} if order is None else {"r": 1, "module_order": order}
    return {"task": task, "method": method, "anchor": anchor, "knobs": knobs, "seed": seed, "lr": lr,
            "accuracy": accuracy, "adapter_params": params, "majority_baseline": baseline}


def test_tie_band_is_twice_the_pooled_seed_std():
    results = [result("a", "gfa", "1", 0, 0.70), result("a", "gfa", "1", 1, 0.72),          # var 2
               result("a", "dora", "1", 0, 0.80), result("a", "dora", "1", 1, 0.81),
               result("a", "dora", "1", 2, 0.85),                                              # var 7
               result("a", "lora", "1", 0, 0.60)]                                              # one seed: not pooled
    band = tie_band(summarize(results)["cells"])
    pooled = math.sqrt((1 * 2 + 2 * 7) / 3)
    assert band["pooled_std_pp"] == pytest.approx(pooled)
    assert band["band_pp"] == pytest.approx(2 * pooled) and band["cells_pooled"] == 2


def test_one_seed_falls_back_to_the_papers_band():
    band = tie_band(summarize([result("a", "gfa", "1", 0, 0.7), result("a", "dora", "1", 0, 0.8)])["cells"])
    assert band["band_pp"] == PAPER_TIE_BAND == 1.4 and band["pooled_std_pp"] is None
    assert "paper" in band["source"]


@pytest.mark.parametrize("gfa, dora, verdict", [(0.75, 0.73, "win"), (0.73, 0.75, "loss"), (0.743, 0.73, "tie"),
                                                 (0.7275, 0.7375, "tie")])
def test_verdicts_compare_gfa_with_dora_within_the_band(gfa, dora, verdict):
    cells = summarize([result("a", "gfa", "4", 0, gfa), result("a", "dora", "4", 0, dora),
                       result("a", "gfa", "1/2", 0, 0.7)])["cells"]
    (row,) = verdicts(cells, band=1.4)  # "1/2" has no DoRA: no verdict there
    assert row["verdict"] == verdict and row["gap_pp"] == pytest.approx(100 * (gfa - dora))


def test_a_gap_exactly_at_the_band_is_a_tie():
    cells = [{"task": "a", "method": "gfa", "anchor": "1", "module_order": None, "mean": 75.0},
             {"task": "a", "method": "dora", "anchor": "1", "module_order": None, "mean": 73.5}]
    assert verdicts(cells, band=1.5)[0]["verdict"] == "tie"


def test_retention_is_accuracy_at_half_over_accuracy_at_16():
    cells = summarize([result("a", "gfa", "1/2", 0, 0.776), result("a", "gfa", "1/2", 1, 0.780),
                       result("a", "gfa", "16", 0, 0.80), result("a", "gfa", "16", 1, 0.80),
                       result("a", "lora", "16", 0, 0.81)])["cells"]
    (row,) = retention(cells)
    assert row["retention"] == pytest.approx(77.8 / 80.0) and row["drop_pp"] == pytest.approx(2.2)


def test_a_drop_is_printed_as_a_negative_change():
    summary = summarize([result("a", "gfa", "1/2", 0, 0.713), result("a", "gfa", "16", 0, 0.80),
                         result("a", "dora", "16", 0, 0.79)])
    retention_table = next(block for block in format_summary(summary).split("\n\n") if "change pp" in block)
    assert retention_table.splitlines()[1].split()[-1] == "-8.7"


def test_learning_rate_choice_averages_over_tasks_and_breaks_ties_low():
    cells = summarize([result("a", "gfa", "4", 0, 0.70, lr=0.01), result("b", "gfa", "4", 0, 0.90, lr=0.01),
                       result("a", "gfa", "4", 0, 0.75, lr=0.03), result("b", "gfa", "4", 0, 0.80, lr=0.03),
                       result("a", "lora", "4", 0, 0.70, lr=0.001), result("a", "lora", "4", 0, 0.70, lr=0.003)])
    choices = choose_learning_rates(cells["cells"])
    assert choices["gfa"]["lr"] == 0.01 and choices["gfa"]["mean_by_lr"][0.03] == pytest.approx(77.5)
    assert choices["lora"]["lr"] == 0.001
    assert cells["verdicts"] == [] and cells["retention"] == []  # several rates per cell: nothing to compare
    assert choices["gfa"]["cells_compared"] == 2


def test_learning_rates_are_compared_on_the_cells_every_rate_was_tried_on():
    # 0.01 tried at anchors 1 and 16, 0.003 (a later extension of the folder) only at 16, where it is better:
    # over each rate's own cells 0.01 would win (75.0 against 72.0) with a cell 0.003 never saw
    cells = summarize([result("a", "gfa", "1", 0, 0.80, lr=0.01), result("a", "gfa", "16", 0, 0.70, lr=0.01),
                       result("a", "gfa", "16", 0, 0.72, lr=0.003),
                       result("a", "lora", "1", 0, 0.60, lr=0.01), result("a", "lora", "16", 0, 0.62, lr=0.003)])
    choices = choose_learning_rates(cells["cells"])
    assert choices["gfa"] == {"lr": 0.003, "mean_by_lr": {0.003: pytest.approx(72.0), 0.01: pytest.approx(70.0)},
                              "loss_by_lr": {0.003: None, 0.01: None}, "cells_compared": 1, "cells_tried": 2}
    assert choices["lora"]["cells_compared"] == 0 and choices["lora"]["lr"] == 0.003  # nothing shared: own cells
    from gfa_peft.cli.tune import unshared_notes

    assert unshared_notes(choices) == [
        "gfa: its rates were tried on different (task, anchor) cells; the mean and the choice use the 1 of 2 cells "
        "every rate was tried on",
        "lora: its rates were tried on different (task, anchor) cells; the mean and the choice use the 0 of 2 cells "
        "every rate was tried on (none: each rate's own cells)"]


def loss_result(task, method, anchor, seed, accuracy, lr, loss):
    return {**result(task, method, anchor, seed, accuracy, lr=lr), "final_train_loss": loss}


def test_the_loss_rule_takes_the_lowest_loss_among_rates_within_the_band_of_the_best_dev():
    # dev: 0.001 61.0, 0.003 60.0, 0.01 57.0 (band 1.4); loss: 0.01 lowest, then 0.003, then 0.001
    cells = summarize([loss_result("a", "gfa", "1", 0, 0.61, 0.001, 3.4), loss_result("a", "gfa", "1", 0, 0.60, 0.003, 3.2),
                       loss_result("a", "gfa", "1", 0, 0.57, 0.01, 3.1)])["cells"]
    assert choose_learning_rates(cells)["gfa"]["lr"] == 0.001  # the best dev accuracy
    chosen = choose_learning_rates(cells, rule="loss", band=1.4)["gfa"]
    assert chosen["lr"] == 0.003  # 0.01 fits best but its dev is 4 points below the best, outside the band
    assert chosen["loss_by_lr"] == {0.001: pytest.approx(3.4), 0.003: pytest.approx(3.2), 0.01: pytest.approx(3.1)}
    assert choose_learning_rates(cells, rule="loss", band=5.0)["gfa"]["lr"] == 0.01


def test_per_anchor_choices_pick_a_rate_for_each_anchor():
    cells = summarize([loss_result(task, "lora", anchor, 0, accuracy, lr, loss) for task, anchor, lr, accuracy, loss in [
        ("a", "1", 0.01, 0.70, 3.0), ("b", "1", 0.01, 0.60, 3.0), ("a", "1", 0.003, 0.69, 3.2), ("b", "1", 0.003, 0.60, 3.2),
        ("a", "16", 0.01, 0.65, 3.4), ("b", "16", 0.01, 0.55, 3.4), ("a", "16", 0.003, 0.72, 2.9),
        ("b", "16", 0.003, 0.62, 2.9)]])["cells"]
    per_method = choose_learning_rates(cells)["lora"]
    assert per_method["lr"] == 0.003 and per_method["cells_compared"] == 4  # 66.75 over both anchors, against 62.5
    for rule in LR_CHOICE_RULES:
        chosen = choose_learning_rates(cells, per_anchor=True, rule=rule)["lora"]
        assert chosen["lr"] == {"1": 0.01, "16": 0.003}
        assert chosen["by_anchor"]["1"]["mean_by_lr"] == {0.003: pytest.approx(64.5), 0.01: pytest.approx(65.0)}
        assert chosen["by_anchor"]["16"]["cells_compared"] == 2
    # full fine-tuning has no anchor (a run looks its rate up by none): one rate, not a map keyed "full"
    full = summarize([loss_result("a", "full", None, 0, accuracy, lr, 3.0) for accuracy, lr in [(0.6, 1e-4), (0.7, 3e-4)]])
    assert choose_learning_rates(full["cells"], per_anchor=True)["full"]["lr"] == 3e-4


# ---------------------------------------------------------------- the permutation diagnostic: GFA across module orders

def test_module_orders_multiply_only_the_gfa_runs(cache, tmp_path):
    grid = spec(cache, module_orders=("model", "by_name", "7"), seeds=(0,))
    names = sorted(run.name for run, _ in sweep_module.plan(grid, tmp_path).runs)
    assert names == sorted([f"gfa-{anchor}-s0-order-{order}-lr0.01{GFA_RULE_SUFFIX}" for anchor in ("1_2", "1")
                            for order in ("model", "by_name", "7")] + ["lora-1-s0-lr0.01"])


def test_module_orders_without_gfa_are_refused(cache, tmp_path):
    with pytest.raises(RunConfigError, match=r"--module-orders orders GFA's modules; none of this sweep's methods \(lora\)"):
        sweep_module.plan(spec(cache, methods=("lora",), module_orders=("by_name",)), tmp_path)


def test_order_spread_sets_the_spread_of_order_means_against_the_seed_spread():
    results = [result("a", "gfa", "16", 0, 0.70, order="model"), result("a", "gfa", "16", 1, 0.72, order="model"),
               result("a", "gfa", "16", 0, 0.74, order=3), result("a", "gfa", "16", 1, 0.74, order=3),
               result("a", "gfa", "16", 0, 0.80, order="by_name"), result("a", "gfa", "16", 1, 0.78, order="by_name"),
               result("a", "lora", "16", 0, 0.60)]
    summary = summarize(results)
    (row,) = summary["order_spread"]
    assert row["orders"] == pytest.approx({"model": 71.0, "3": 74.0, "by_name": 79.0})
    means = [71.0, 74.0, 79.0]
    mean = sum(means) / 3
    assert row["order_std_pp"] == pytest.approx(math.sqrt(sum((value - mean) ** 2 for value in means) / 2))
    assert row["order_range_pp"] == pytest.approx(8.0)
    assert row["seed_std_pp"] == pytest.approx(math.sqrt((2 + 0 + 2) / 3))  # sample variances 2, 0, 2; 1 dof each
    assert {cell["module_order"] for cell in summary["cells"]} == {"model", 3, "by_name", None}



def test_zero_shot_runs_once_per_task_and_is_summarised_as_the_untrained_row(cache, tmp_path, capsys):
    grid = spec(cache, model="smollm2", tasks=("arc_easy",), methods=("zero-shot", "lora"), anchors=("1",),
                seeds=(3, 4), learning_rates=(1e-2, 1e-3))
    names = sorted(run.name for run, _ in sweep_module.plan(grid, tmp_path).runs)
    assert names == ["lora-1-s3-lr0.001", "lora-1-s3-lr0.01", "lora-1-s4-lr0.001", "lora-1-s4-lr0.01", "zero-shot-s3"]
    summary = run_sweep(replace(grid, learning_rates=None, methods=("zero-shot",)), tmp_path / "sweep",
                        progress=False, log=lambda message: None)
    (cell,) = summary["cells"]
    assert (cell["method"], cell["anchor"], cell["n"], cell["adapter_params"]) == ("zero-shot", "zero-shot", 1, 0)
    assert summary["zero_shot"] == {"arc_easy": cell["mean"]}
    assert f"zero-shot (the pretrained model, untrained): arc_easy {cell['mean']:.1f}%" in format_summary(summary)
    assert main(["tune", "--model", "smollm2", "--tasks", "arc_easy", "--methods", "zero-shot,lora", "--lrs", "0.01",
                 "--cache", str(cache), "--out", str(tmp_path / "tune")]) == 2
    assert "no learning rate to tune" in capsys.readouterr().err and not (tmp_path / "tune").exists()


def test_a_mixture_gets_one_row_per_task_equal_to_the_tasks_run_alone(cache, tmp_path):
    """Zero-shot trains nothing, so the mixture's rows must equal each task's own zero-shot run."""
    grid = spec(cache, model="smollm2", methods=("zero-shot",), seeds=(0,), learning_rates=None)
    mixed = run_sweep(replace(grid, tasks=("arc_easy+obqa",)), tmp_path / "mixed", progress=False,
                      log=lambda message: None)
    alone = run_sweep(replace(grid, tasks=("arc_easy", "obqa")), tmp_path / "alone", progress=False,
                      log=lambda message: None)
    assert [(cell["task"], cell["mean"]) for cell in mixed["cells"]] == [
        (cell["task"], cell["mean"]) for cell in alone["cells"]]
    assert mixed["baselines"] == alone["baselines"] and mixed["zero_shot"] == alone["zero_shot"]
    assert (tmp_path / "mixed" / "arc_easy+obqa" / "zero-shot-s0" / "metrics.json").is_file()
    with pytest.raises(RunConfigError, match="both as 'arc_easy' and as 'arc_easy\\+obqa'"):
        run_sweep(replace(grid, tasks=("arc_easy", "arc_easy+obqa")), tmp_path / "both", progress=False)
    assert not (tmp_path / "both").exists()


# ---------------------------------------------------------------- several processes on one sweep folder

def test_a_run_another_process_is_training_is_left_to_it(cache, tmp_path, monkeypatch):
    root = tmp_path / "sweep"
    grid = spec(cache, seeds=(0,))
    run_sweep(replace(grid, methods=("lora",)), root, progress=False, log=lambda message: None)
    taken = root / "rt" / f"gfa-1-s0-lr0.01{GFA_RULE_SUFFIX}"
    messages = []
    with folder_lock(taken):  # as another `gfa sweep` training that run
        summary = run_sweep(grid, root, progress=False, log=messages.append)
    assert not taken.exists()
    assert sorted(path.name for path in (root / "rt").iterdir()) == [f"gfa-1_2-s0-lr0.01{GFA_RULE_SUFFIX}",
                                                                      "lora-1-s0-lr0.01"]
    assert [(cell["method"], cell["anchor"]) for cell in summary["cells"]] == [("gfa", "1/2"), ("lora", "1")]
    assert any(f"gfa-1-s0-lr0.01{GFA_RULE_SUFFIX}: being trained by another process" in message for message in messages)
    assert messages[-1] == ("the summary lacks 1 unfinished run(s): 1 being trained by another process "
                            f"(rt/gfa-1-s0-lr0.01{GFA_RULE_SUFFIX})")

    trained = []
    original = sweep_module.execute
    monkeypatch.setattr(sweep_module, "execute", lambda *args, **kwargs: trained.append(args[1].name)
                        or original(*args, **kwargs))
    summary = run_sweep(grid, root, progress=False, log=lambda message: None)
    assert trained == [f"gfa-1-s0-lr0.01{GFA_RULE_SUFFIX}"] and len(summary["cells"]) == 3


def test_two_sweeps_on_one_folder_share_the_runs_and_train_each_once(cache, tmp_path):
    root = tmp_path / "sweep"
    command = [sys.executable, "-m", "gfa_peft.cli", "sweep", "--methods", "gfa,lora", "--anchors", "1/2,1",
               "--seeds", "0,1", "--lrs", "0.01", "--steps", "2", "--cache", str(cache), "--out", str(root),
               "--no-progress"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=environment) for _ in range(2)]
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    trained = sorted(re.findall(r"\] rt (\S+): accuracy", "\n".join(outputs)))
    runs = sorted(path.name for path in (root / "rt").iterdir())
    assert trained == runs and len(runs) == 6  # every run trained, each by one process only
    assert all(is_finished(root / "rt" / name) for name in runs)
    summary = json.loads((root / "results.json").read_text())  # written last by the process that ended last
    assert [cell["n"] for cell in summary["cells"]] == [2, 2, 2]


def test_a_grid_run_in_pieces_is_summarised_whole(cache, tmp_path):
    root = tmp_path / "sweep"
    quiet = {"progress": False, "log": lambda message: None}
    three_seeds = spec(cache, methods=("gfa",), anchors=("1/2",), seeds=(0, 1, 2))
    run_sweep(three_seeds, root, **quiet)
    one_seed = spec(cache, methods=("gfa", "lora"), anchors=("1",), seeds=(0,))
    summary = run_sweep(one_seed, root, **quiet)
    assert [(cell["method"], cell["anchor"], cell["n"]) for cell in summary["cells"]] == [
        ("gfa", "1/2", 3), ("gfa", "1", 1), ("lora", "1", 1)]
    assert json.loads((root / "results.json").read_text())["cells"] == summary["cells"]
    (tmp_path / "elsewhere").symlink_to(cache)
    moved = spec(tmp_path / "elsewhere", methods=("gfa",), anchors=("1/2",), seeds=(0, 1, 2))  # only the cache differs
    assert run_sweep(moved, root, **quiet)["cells"] == summary["cells"]
    recorded = json.loads((root / "sweep.json").read_text())["grids"]
    assert [(grid["methods"], grid["seeds"]) for grid in recorded] == [(["gfa"], [0, 1, 2]), (["gfa", "lora"], [0])]
    assert all("cache" not in grid["settings"] for grid in recorded)


def test_a_grid_with_other_settings_is_refused_or_replaces_the_folders_grids(cache, tmp_path, capsys):
    root = tmp_path / "sweep"
    run_sweep(spec(cache, methods=("gfa",), anchors=("1",), seeds=(0,)), root, progress=False, log=lambda message: None)
    before = {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}
    command = ["sweep", "--methods", "lora", "--anchors", "1", "--seeds", "0", "--lrs", "0.01", "--steps", "3",
               "--cache", str(cache), "--out", str(root), "--no-progress"]
    assert main(command) == 2
    assert "holds a sweep with other settings (steps: 2 -> 3)" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in root.rglob("*") if path.is_file()} == before
    assert main(command + ["--rerun-changed"]) == 0
    (grid,) = json.loads((root / "sweep.json").read_text())["grids"]
    assert grid["methods"] == ["lora"] and grid["settings"]["steps"] == 3
    cells = json.loads((root / "results.json").read_text())["cells"]
    assert [(cell["method"], cell["anchor"]) for cell in cells] == [("lora", "1")]  # the gfa run is kept, not summarised
    assert is_finished(root / "rt" / f"gfa-1-s0-lr0.01{GFA_RULE_SUFFIX}")


def test_methods_at_their_own_settings_share_a_folder_but_one_method_never_mixes_them(cache, tmp_path):
    root = tmp_path / "sweep"
    quiet = {"progress": False, "log": lambda message: None}
    constant = {"steps": 2, "cache": str(cache), "scale_rule": "constant"}
    run_sweep(spec(cache, methods=("gfa",), anchors=("1",), seeds=(0,), settings=constant), root, **quiet)
    summary = run_sweep(spec(cache, methods=("lora",), anchors=("1",), seeds=(0,)), root, **quiet)
    assert [(cell["method"], cell["anchor"]) for cell in summary["cells"]] == [("gfa", "1"), ("lora", "1")]
    assert sorted(path.name for path in (root / "rt").iterdir()) == ["gfa-1-s0-lr0.01", "lora-1-s0-lr0.01"]
    assert json.loads((root / "rt" / "gfa-1-s0-lr0.01" / "config.json").read_text())["config"][
        "scale_rule"] == "constant"
    refused = sweep_module.ChangedRunsError
    rsqrt = {"steps": 2, "cache": str(cache), "scale_rule": "rsqrt"}
    with pytest.raises(refused, match=r'scale rule of gfa: "constant" -> "rsqrt"'):  # GFA under both rules
        run_sweep(spec(cache, methods=("gfa", "lora"), anchors=("1",), seeds=(0,), settings=rsqrt), root, **quiet)
    three_steps = {"steps": 3, "cache": str(cache)}  # not a method setting: refused whatever the methods
    with pytest.raises(refused, match="steps: 2 -> 3"):
        run_sweep(spec(cache, methods=("dora",), anchors=("1",), seeds=(0,), settings=three_steps), root, **quiet)


def test_each_method_of_a_mixed_sweep_takes_the_method_settings_it_has():
    grid = SweepSpec(methods=("gfa", "lora", "vera"), anchors=("1",),
                     settings={"steps": 2, "module_gain": True, "scale_rule": "rsqrt", "grid": "aligned"})
    settings = {config.method: (config.module_gain, config.scale_rule, config.grid, config.steps)
                for config in grid.configs()}
    assert settings == {"gfa": (True, "rsqrt", "aligned", 2), "lora": (False, "rsqrt", "square", 2),
                        "vera": (False, "auto", "square", 2)}  # the defaults: VeRA has no scale to set
    assert grid.settings_not_for() == {"scale_rule": ["vera"], "module_gain": ["lora", "vera"],
                                       "grid": ["lora", "vera"]}
    assert SweepSpec(methods=("gfa",), settings={"module_gain": True}).settings_not_for() == {}


def test_a_method_setting_none_of_the_sweeps_methods_has_is_refused(cache, tmp_path):
    with pytest.raises(RunConfigError, match=r"--module-gain is a setting of gfa; none of this sweep's methods "
                                             r"\(lora, dora\) has it"):
        run_sweep(spec(cache, methods=("lora", "dora"), settings={"module_gain": True, "cache": str(cache)}),
                  tmp_path / "sweep", progress=False, log=lambda message: None)
    assert not (tmp_path / "sweep").exists()


def test_a_method_setting_only_mixes_grids_for_the_methods_that_have_it():
    def grid(methods, **settings):
        return sweep_module.grid_record(SweepSpec(methods=tuple(methods), settings={"steps": 2, **settings}))

    gained = grid(("gfa", "lora"), module_gain=True)
    assert not sweep_module._would_mix(gained, grid(("lora", "dora")))  # LoRA has no gain: its runs are the same
    assert sweep_module._would_mix(gained, grid(("gfa",)))  # GFA with and without gains in one summary
    assert sweep_module._would_mix(grid(("gfa", "lora"), scale_rule="rsqrt"), grid(("lora",)))  # LoRA has a scale
    assert not sweep_module._would_mix(grid(("vera",), scale_rule="rsqrt"), grid(("vera",)))
    # a rule asked for by name and "auto" standing for it are one setting
    assert not sweep_module._would_mix(grid(("gfa", "lora")), grid(("gfa",), scale_rule=scale_rule_of("gfa")))
    assert not sweep_module._would_mix(grid(("lora",)), grid(("lora",), scale_rule="constant"))


def test_a_folder_swept_before_gfa_s_default_rule_changed_keeps_its_runs(cache, tmp_path, monkeypatch):
    """A grid recorded under "auto" trained GFA under the default of its day; when the default changes, the same
    command is refused (it would add GFA under the new rule), and naming the old rule continues the folder."""
    root = tmp_path / "sweep"
    quiet = {"progress": False, "log": lambda message: None}
    grid = spec(cache, methods=("gfa", "lora"), anchors=("1",), seeds=(0,))
    monkeypatch.setattr(methods, "GFA_SCALE_RULE", "constant")
    run_sweep(grid, root, **quiet)
    record = json.loads((root / "sweep.json").read_text())
    assert record["grids"][0]["scale_rules"] == {"gfa": "constant", "lora": "constant"}
    del record["grids"][0]["scale_rules"]  # as written before records kept the rules
    (root / "sweep.json").write_text(json.dumps(record))
    monkeypatch.setattr(methods, "GFA_SCALE_RULE", "rsqrt")
    before = {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}
    with pytest.raises(sweep_module.ChangedRunsError, match=r'scale rule of gfa: "constant" -> "rsqrt"'):
        run_sweep(grid, root, **quiet)
    assert {path: path.read_bytes() for path in root.rglob("*") if path.is_file()} == before

    trained = []
    monkeypatch.setattr(sweep_module, "execute", lambda run, *args: trained.append(run.name))
    named = replace(grid, settings={**grid.settings, "scale_rule": "constant"})
    summary = run_sweep(named, root, **quiet)
    assert trained == [] and summary["unfinished"] == []
    assert [(cell["method"], cell["n"]) for cell in summary["cells"]] == [("gfa", 1), ("lora", 1)]


def test_a_sweep_whose_only_run_another_process_trains_summarises_nothing_without_failing(cache, tmp_path):
    root = tmp_path / "sweep"
    grid = spec(cache, methods=("gfa",), anchors=("1",), seeds=(0,))
    run_sweep(replace(grid, methods=("lora",)), root, progress=False, log=lambda message: None)
    (root / "rt" / "lora-1-s0-lr0.01").rename(tmp_path / "moved")  # so the folder holds no finished run
    with folder_lock(root / "rt" / f"gfa-1-s0-lr0.01{GFA_RULE_SUFFIX}"):
        summary = run_sweep(grid, root, progress=False, log=lambda message: None)
    assert summary["cells"] == [] and (root / "accuracy_vs_params.png").is_file()


def test_a_sweep_folder_of_one_grid_written_before_grids_were_kept_resumes(cache, tmp_path, monkeypatch):
    root = tmp_path / "sweep"
    grid = spec(cache, methods=("gfa",), anchors=("1",), seeds=(0,))
    run_sweep(grid, root, progress=False, log=lambda message: None)
    old = {**json.loads((root / "sweep.json").read_text())["grids"][0]}
    (root / "sweep.json").write_text(json.dumps({**old, "settings": {**old["settings"], "cache": "/moved"}}))
    trained = []
    monkeypatch.setattr(sweep_module, "execute", lambda run, folder, progress, overwrite: trained.append(folder.name))
    assert run_sweep(grid, root, progress=False, log=lambda message: None)["cells"][0]["n"] == 1
    assert trained == [] and json.loads((root / "sweep.json").read_text()) == {"grids": [old]}
    (root / "sweep.json").write_text("[1, 2]")
    with pytest.raises(sweep_module.OutputRefused, match="sweep.json is not a sweep record"):
        run_sweep(grid, root, progress=False, log=lambda message: None)


def test_the_summary_names_the_runs_of_an_interrupted_piece_as_not_started(cache, tmp_path, monkeypatch):
    root = tmp_path / "sweep"
    grid = spec(cache, seeds=(0,))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(sweep_module, "execute", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_sweep(grid, root, progress=False, log=lambda message: None)
    messages = []
    summary = run_sweep(replace(grid, methods=("lora",)), root, progress=False, log=messages.append)
    assert sorted(summary["unfinished"]) == [f"rt/gfa-{anchor}-s0-lr0.01{GFA_RULE_SUFFIX}" for anchor in ("1", "1_2")]
    assert messages[-1].startswith("the summary lacks 2 unfinished run(s): 2 not started (")
    assert "being trained" not in messages[-1] and "sweep their grid again" in messages[-1]


def test_tune_leaves_the_choice_to_the_process_that_ends_last(cache, tmp_path, capsys, monkeypatch):
    from gfa_peft.cli import tune

    monkeypatch.setattr(tune, "run_spec", lambda *args, **kwargs: {"cells": [], "unfinished": ["rt/gfa-1-s0"]})
    out = tmp_path / "tune"
    assert main(["tune", "--methods", "gfa", "--lrs", "0.01", "--cache", str(cache), "--out", str(out),
                 "--save-defaults"]) == 0
    assert "1 trial(s) unfinished: the `gfa tune` that finishes the last of them chooses" in capsys.readouterr().out
    assert not out.exists()


@pytest.mark.parametrize("rates, lines", [
    ({"1": [1e-2], "16": [3e-3]}, {"LoRA"}),  # a rate tuned per anchor: one line through the anchors
    ({"1": [1e-2, 3e-3], "16": [1e-2, 3e-3]}, {"LoRA, lr 0.01", "LoRA, lr 0.003"}),  # a tuning sweep: one per rate
    ({"1": [3e-3], "16": [3e-3]}, {"LoRA"}),
])
def test_the_figure_draws_a_line_per_method_or_per_tried_rate(tmp_path, monkeypatch, rates, lines):
    from gfa_peft.io import plots

    drawn = {}
    monkeypatch.setattr(plots, "save_figure", lambda figure, path: drawn.setdefault("axes", figure.axes))
    cells = [{"task": "rt", "method": "lora", "anchor": anchor, "lr": lr, "module_order": None, "rank": 1,
              "adapter_params": 100 * int(anchor), "mean": 80.0, "std": 1.0}
             for anchor, tried in rates.items() for lr in tried]
    plots.plot_sweep({"cells": cells, "baselines": {}, "task_titles": {}}, tmp_path / "figure.png")
    handles, labels = drawn["axes"][0].get_legend_handles_labels()
    assert set(labels) == lines and len(labels) == len(lines)
    assert all(len(handle.lines[0].get_xdata()) == len(rates) for handle in handles)  # every line spans the anchors
