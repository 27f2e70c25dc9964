"""A grid of runs (tasks x methods x anchors x seeds, optionally x learning rates) that resumes, and its tables.

`run_sweep` checks every run of the grid before training any, skips the runs whose folder already holds a
finished run with the same settings (so an interrupted sweep picks up where it stopped, redoing only the
unfinished run), and then summarises the finished runs: one row per (task, method, anchor, learning rate)
cell with the mean and standard deviation over seeds, the tie band, GFA-vs-DoRA verdicts, the retention
table and the majority-class baselines. Accuracies in the summary are in percentage points. A run on a mixture of
tasks ("arc_easy+boolq") counts as one result per task it was scored on, so its tasks get their own rows.

A finished run recorded with other settings (other steps, batch size, ... than the sweep asks for now) is never
reused nor summarised as if it were the asked one: the sweep names the runs that differ and stops before training,
or, with `rerun_changed`, trains them again (each replaced once its new run is complete). Several processes may
share a sweep folder: each run folder is written by one process at a time (io/files.py's lock), and a run another
process is training is left to it.

A grid may be run in pieces: several sweeps with the same settings into one folder (say, three seeds at some anchors
and two at others) each add their grid to the folder's sweep.json, and the summary covers the runs of all of them.
A sweep with other settings (or another model) than the folder's grids is refused, so a summary never mixes two
recipes; with `rerun_changed` it replaces them.

Tie band: twice the pooled seed standard deviation, pooled over every cell with at least two seeds
(variance weighted by its n - 1); with no such cell, the paper's +/-1.4pp (from its pooled 0.7pp).
A gap within the band is a tie; the band's edge itself counts as a tie, as the paper counts it.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from gfa_peft.io.files import (
    OutputRefused,
    ResultKind,
    check_output_folder,
    folder_is_busy,
    folder_lock,
    make_folder,
    write_json_atomic,
    write_text_atomic,
)
from gfa_peft.data.task_registry import MIXTURE_JOIN, task_title
from gfa_peft.defaults import LR_CHOICE_RULES

from gfa_peft.io.tables import text_table
from gfa_peft.training.config import flag
from gfa_peft.training.methods import (
    AUTO_SCALE_RULE,
    METHOD_SETTINGS,
    METHODS,
    SCALED_METHODS,
    UNANCHORED,
    ZERO_SHOT,
    scale_rule_of,
    setting_owners,
)
from gfa_peft.training.run import (
    PreparedRun,
    RunConfig,
    RunConfigError,
    changed_settings,
    check_run_folder,
    execute,
    is_finished,
    final_train_loss,
    load_run,
    prepare,
)

PAPER_TIE_BAND = 1.4
"""The paper's tie band in percentage points: +/-2 x its pooled seed standard deviation of 0.7pp."""
README_TIE_BAND = 3.2
"""The README's band: +/-2 x the pooled seed std of its 3-seed MiniLM sweep on rt and trec6 (1.6pp)."""
RETENTION_FROM = "1/2"
RETENTION_TO = "16"
SPEC_FILE = "sweep.json"
FIGURE_FILE = "accuracy_vs_params.png"
SWEEP = ResultKind("sweep", is_own=lambda folder: (folder / SPEC_FILE).is_file(), is_finished=lambda folder: False)
"""A sweep folder is one with its sweep.json; a sweep adds runs to it and never replaces it."""
WHERE_NOT_HOW = ("cache",)
"""Sweep settings that say where the inputs lie, not how the runs train: a grid is recorded without them."""
SCALE_RULES_KEY = "scale_rules"
"""A recorded grid's rule for each scaled method: "auto" names the method's own rule when the grid was swept, which
a later version may change, so the record keeps the rule itself."""


class ChangedRunsError(OutputRefused):
    """The sweep's folder holds finished runs, or grids, trained with other settings than the sweep's."""


@dataclass(frozen=True)
class SweepSpec:
    """The grid. `settings` are RunConfig fields shared by every run (steps, eval_split, cache, ...)."""

    model: str = "minilm"
    tasks: tuple[str, ...] = ("rt",)
    methods: tuple[str, ...] = ("gfa", "lora", "dora")
    anchors: tuple[str, ...] = ("1/2", "1", "4", "16")
    seeds: tuple[int, ...] = (0,)
    learning_rates: tuple[float, ...] | None = None
    """None: each method's tuned default. A tuple: every run once per learning rate (tuning)."""
    module_orders: tuple[str, ...] | None = None
    """None: GFA in the model's order. A tuple: every GFA run once per concatenation order (the permutation
    diagnostic)."""
    settings: dict[str, Any] = field(default_factory=dict)

    def configs(self) -> list[RunConfig]:
        """Every run of the grid; full fine-tuning, which has no anchor, once per task and seed; zero-shot, which
        trains nothing and so does not depend on the seed, once per task (at the first seed). Each method takes the
        METHOD_SETTINGS it has (`--module-gain` reaches the GFA runs, not LoRA's) and the defaults of the others."""
        configs = []
        for task in self.tasks:
            for method in self.methods:
                base = RunConfig(model=self.model, **self.own_settings(method))
                anchors = [None] if method in UNANCHORED else self.anchors
                orders = self.module_orders if method == "gfa" and self.module_orders else [None]
                seeds = self.seeds[:1] if method == ZERO_SHOT else self.seeds
                rates = [None] if method == ZERO_SHOT else self.learning_rates or [None]
                for anchor, order, seed, lr in itertools.product(anchors, orders, seeds, rates):
                    configs.append(replace(base, task=task, method=method, anchor=anchor, module_order=order,
                                           seed=seed, lr=lr))
        return configs

    def own_settings(self, method: str) -> dict[str, Any]:
        """The grid's settings less the METHOD_SETTINGS that `method` does not have."""
        return {name: value for name, value in self.settings.items()
                if name not in METHOD_SETTINGS or method in METHOD_SETTINGS[name]}

    def settings_not_for(self) -> dict[str, list[str]]:
        """Each method setting the grid sets that some of its methods lack, and those methods (they run without)."""
        lacking = {name: [method for method in self.methods if method not in owners]
                   for name, owners in METHOD_SETTINGS.items() if name in self.settings}
        return {name: methods for name, methods in lacking.items() if methods}


@dataclass
class Plan:
    """The runs of a sweep that can be placed, their folders, and the cells no method can reach."""

    runs: list[tuple[PreparedRun, Path]]
    unreachable: list[str]


def plan(spec: SweepSpec, root: Path) -> Plan:
    """Prepare every run of the grid. Cells a method cannot reach (LoRA at "1/2") are left out and listed;
    any other problem raises RunConfigError before anything is trained."""
    _check_tasks_appear_once(spec.tasks)
    if spec.module_orders and not any(method in METHOD_SETTINGS["module_order"] for method in spec.methods):
        raise RunConfigError(f"--module-orders orders GFA's modules; none of this sweep's methods "
                             f"({', '.join(spec.methods)}) has them")
    for name, methods in spec.settings_not_for().items():
        if set(methods) == set(spec.methods):  # it would be recorded and change nothing
            raise RunConfigError(f"{setting_owners(name)}; none of this sweep's methods ({', '.join(spec.methods)}) "
                                 "has it")
    runs, unreachable = [], []
    for config in spec.configs():
        try:
            run = prepare(config)
        except RunConfigError as error:
            if not error.unreachable:
                raise
            label = f"{config.task} {config.method} at {config.anchor}"
            if label not in unreachable:  # one label per cell, not one per seed
                unreachable.append(label)
            continue
        runs.append((run, root / run.task.name / run.name))
    return Plan(runs, unreachable)


def _check_tasks_appear_once(tasks: Sequence[str]) -> None:
    """The summary has one row per task: a task both alone and in a mixture (or in two) would mix two
    trainings in one row."""
    seen: dict[str, str] = {}
    for entry in tasks:
        for task in entry.split(MIXTURE_JOIN):
            if task in seen and seen[task] != entry:
                raise RunConfigError(f"task {task} is in the grid both as {seen[task]!r} and as {entry!r}: their "
                                     "results would share one row; sweep them into separate folders")
            seen[task] = entry


def run_sweep(spec: SweepSpec, root: Path, progress: bool = True,
              log: Callable[[str], object] = tqdm.write, rerun_changed: bool = False) -> dict[str, Any]:
    """Train every unfinished run of the grid into `root`, then write and return the summary (with `unfinished`:
    the runs of its grids that another process trains, or that no process has started, whose results it lacks).

    Several processes may run the same sweep on one folder at once (e.g. two with OMP_NUM_THREADS=1 on a 2-core
    machine): each trains the runs no other is training (a run's folder lock says which) and finishes none twice;
    the summary covers the runs finished when it is written, and the last process to end writes the complete one.
    It covers the runs of every grid swept into `root` with these settings, not only this one's.

    Raises ChangedRunsError, before anything is written, when finished runs in `root`, or its grids, were trained
    with other settings, unless `rerun_changed` (then those runs are trained again and those grids forgotten)."""
    sweep = plan(spec, root)
    check_output_folder(root, SWEEP)
    make_folder(root)
    with folder_lock(root, wait=True):  # the checks and the record, not the training: other sweeps may join
        changed = {folder: changes for run, folder in sweep.runs
                   if is_finished(folder) and (changes := changed_settings(run, folder))}
        if changed and not rerun_changed:
            raise ChangedRunsError(f"{len(changed)} finished run(s) in {root} were trained with other settings: "
                                   + "; ".join(f"{folder.relative_to(root)} ({', '.join(changes)})"
                                               for folder, changes in changed.items())
                                   + "; pass --rerun-changed to train them again, or choose another folder")
        grids = joined_grids(root, spec, rerun_changed)
        current = grid_record(spec)
        summarized = list(dict.fromkeys(folder for grid in grids for _, folder in
                                        (sweep if grid == current else plan(grid_spec(grid, spec), root)).runs))
        todo = [(run, folder) for run, folder in sweep.runs if not is_finished(folder) or folder in changed]
        for run, folder in todo:  # a folder of other files anywhere in the grid stops the sweep before it trains
            check_run_folder(run, folder, overwrite=folder in changed)
        write_json_atomic(root / SPEC_FILE, {"grids": grids})
    log(f"sweep {root}: {len(sweep.runs)} runs, {len(sweep.runs) - len(todo)} already finished, "
        f"{len(todo)} to run" + (f" ({len(changed)} with changed settings)" if changed else "")
        + (f"; unreachable, left out: {', '.join(sweep.unreachable)}" if sweep.unreachable else "")
        + "".join(f"; {flag(name)} is not a setting of {', '.join(methods)}: they run without it"
                  for name, methods in spec.settings_not_for().items()))
    for number, (run, folder) in enumerate(todo, 1):
        if _finished_as_asked(run, folder):  # by another process meanwhile
            continue
        log(f"[{number}/{len(todo)}] {run.task.name} {run.name}")
        try:
            metrics = execute(run, folder, progress, folder in changed)
        except OutputRefused:
            if _finished_as_asked(run, folder) or folder_is_busy(folder):  # another process took it meanwhile
                log(f"[{number}/{len(todo)}] {run.task.name} {run.name}: being trained by another process")
                continue
            raise
        each = "".join(f", {task} {100 * scores['accuracy']:.1f}%" for task, scores in metrics.get("by_task", {}).items())
        log(f"[{number}/{len(todo)}] {run.task.name} {run.name}: accuracy {100 * metrics['accuracy']:.1f}%"
            f"{' (mean)' + each if each else ''}, {metrics['wall_seconds']:.0f} s")
    with folder_lock(root, wait=True):
        summary = write_summary(root, summarized)
    if summary["unfinished"]:
        log(_unfinished_note(root, summary["unfinished"]))
    return summary


def _unfinished_note(root: Path, unfinished: list[str]) -> str:
    """Which runs the summary lacks, and why: another process is training them now, or none has started them (a
    sweep still under way will, or their grid must be swept again: an earlier piece may have been interrupted)."""
    busy = [name for name in unfinished if folder_is_busy(root / name)]
    waiting = [name for name in unfinished if name not in busy]
    parts = [f"{len(busy)} being trained by another process ({', '.join(busy)})"] if busy else []
    if waiting:
        parts.append(f"{len(waiting)} not started ({', '.join(waiting)}), which a sweep of their grid still under way "
                     "will train; if none is, sweep their grid again")
    return f"the summary lacks {len(unfinished)} unfinished run(s): " + "; ".join(parts)


def _finished_as_asked(run: PreparedRun, folder: Path) -> bool:
    return is_finished(folder) and not changed_settings(run, folder)


def grid_record(spec: SweepSpec) -> dict[str, Any]:
    """A grid as sweep.json records it: as JSON reads it back (tuples are lists), without where its inputs lay,
    with the scale rule each of its scaled methods trains under."""
    record = _without_where(json.loads(json.dumps(asdict(spec))))
    return {**record, SCALE_RULES_KEY: _scale_rules(spec.methods, spec.settings)}


def _scale_rules(methods: Sequence[str], settings: dict[str, Any]) -> dict[str, str]:
    """The rule each scaled method of a grid trains under today (`scale_rule_of`)."""
    asked = settings.get("scale_rule", AUTO_SCALE_RULE)
    return {method: scale_rule_of(method, asked) for method in methods if method in SCALED_METHODS}


def _with_scale_rules(record: dict[str, Any]) -> dict[str, Any]:
    """A recorded grid with its scale rules; a grid recorded before they were kept trained under "auto" every
    method under constant (GFA's default then)."""
    if SCALE_RULES_KEY in record:
        return record
    asked = record["settings"].get("scale_rule", AUTO_SCALE_RULE)
    then = {"scale_rule": "constant" if asked == AUTO_SCALE_RULE else asked}
    return {**record, SCALE_RULES_KEY: _scale_rules(record["methods"], then)}


def _without_where(record: dict[str, Any]) -> dict[str, Any]:
    """A recorded grid without the settings that say where its inputs lay (older sweep.json files kept them)."""
    return {**record, "settings": {name: value for name, value in record["settings"].items()
                                   if name not in WHERE_NOT_HOW}}


def grid_spec(record: dict[str, Any], spec: SweepSpec) -> SweepSpec:
    """The grid `record` describes, with its inputs where `spec` finds them. Raises OutputRefused for a record
    this version cannot read."""
    where = {name: value for name, value in spec.settings.items() if name in WHERE_NOT_HOW}
    settings = {**record["settings"], **where}
    rules = _with_scale_rules(record)[SCALE_RULES_KEY]
    if rules != _scale_rules(record["methods"], settings):  # "auto" meant another rule when the grid was swept
        if len(set(rules.values())) != 1:
            raise OutputRefused(f"{SPEC_FILE} records a grid whose methods trained under the scale rules {rules}, "
                                "which no single --scale-rule gives today; choose another folder")
        settings["scale_rule"] = next(iter(rules.values()))
    fields = {name: value for name, value in record.items() if name != SCALE_RULES_KEY}
    tuples = {name: tuple(value) for name, value in fields.items() if isinstance(value, list)}
    try:
        return SweepSpec(**{**fields, **tuples, "settings": settings})
    except TypeError as error:
        raise OutputRefused(f"{SPEC_FILE} records a grid this version cannot read ({error}); "
                            "choose another folder") from None


def _shown(setting: Any) -> str:
    """A grid setting as the refusal names it; one not given (None) is the recipe's default."""
    return "default" if setting is None else json.dumps(setting)


def joined_grids(root: Path, spec: SweepSpec, rerun_changed: bool) -> list[dict[str, Any]]:
    """The records of the grids of `root` with `spec`'s added (once), every one with the model and settings of
    `spec`, or differing only in METHOD_SETTINGS for methods `spec` does not run (each method at its own setting:
    GFA under s = 1/sqrt(r) beside LoRA under alpha = r). Raises ChangedRunsError when `root` holds a grid that
    would mix settings within a method or differs otherwise, unless `rerun_changed` (then that grid is forgotten:
    its runs stay on disk, out of the summary)."""
    path = root / SPEC_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"grids": []}
        recorded = [_with_scale_rules(_without_where(grid))
                    for grid in record.get("grids", [record])]  # or an older file's one grid
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError):
        raise OutputRefused(f"{path} is not a sweep record this version can read; choose another folder") from None
    current = grid_record(spec)
    others = [grid for grid in recorded if _would_mix(grid, current)]
    if others and not rerun_changed:
        both = set(others[0]["methods"]) & set(current["methods"])
        theirs, ours = _compared(others[0], both), _compared(current, both)
        changes = [f"{name}: {_shown(theirs.get(name))} -> {_shown(ours.get(name))}"
                   for name in sorted(set(theirs) | set(ours)) if theirs.get(name) != ours.get(name)]
        raise ChangedRunsError(f"{root} holds a sweep with other settings ({', '.join(changes)}); its summary would "
                               "mix them: pass --rerun-changed to replace it, or choose another folder")
    kept = [grid for grid in recorded if grid not in others]
    return kept if current in kept else [*kept, current]


def _compared(grid: dict[str, Any], methods: set[str]) -> dict[str, Any]:
    """What two grids running `methods` both are compared on: the model, the settings, and each of those methods'
    scale rule (not the asked `scale_rule`: "auto" and the rule it stands for are one setting)."""
    settings = {name: value for name, value in grid["settings"].items() if name != "scale_rule"}
    rules = {f"scale rule of {method}": rule for method, rule in grid[SCALE_RULES_KEY].items() if method in methods}
    return {"model": grid.get("model"), **settings, **rules}


def _would_mix(grid: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether two grids' runs may not share a summary: another model, another setting of the runs around the
    methods (steps, data, ...), or another method setting (or scale rule) for a method both run."""
    if grid.get("model") != current["model"]:
        return True
    names = (set(grid["settings"]) | set(current["settings"])) - {"scale_rule"}
    differing = {name for name in names if grid["settings"].get(name) != current["settings"].get(name)}
    shared_methods = set(grid["methods"]) & set(current["methods"])
    other_rule = any(grid[SCALE_RULES_KEY].get(method) != current[SCALE_RULES_KEY].get(method)
                     for method in shared_methods)
    return bool(differing - set(METHOD_SETTINGS) or other_rule
                or any(method in METHOD_SETTINGS[name] for name in differing for method in shared_methods))


# ---------------------------------------------------------------- summary

def write_summary(root: Path, folders: Sequence[Path]) -> dict[str, Any]:
    """Summarise the finished runs among `folders` into results.json, results.csv and the figure; the summary
    returned also lists, under `unfinished`, the folders (relative to `root`) it lacks, and gives the figure's
    path with `root` (results.json gives it relative to `root`)."""
    from gfa_peft.io.plots import plot_sweep

    finished = [folder for folder in folders if is_finished(folder)]
    results = [result for folder in finished
               for result in per_task({**load_run(folder)[1], "final_train_loss": final_train_loss(folder)})]
    summary = summarize(results)
    summary["unfinished"] = [str(folder.relative_to(root)) for folder in folders if folder not in finished]
    summary["figure"] = FIGURE_FILE  # relative to the sweep folder, so the record holds on any machine
    write_json_atomic(root / "results.json", summary)
    write_text_atomic(root / "results.csv", cells_csv(summary["cells"]))
    plot_sweep(summary, root / FIGURE_FILE)
    return {**summary, "figure": str(root / FIGURE_FILE)}


def per_task(result: dict[str, Any]) -> list[dict[str, Any]]:
    """A run's result for each task it was scored on: the result itself, or for a run on a mixture one result
    per task of it, with that task's metrics and the mixture's name under `mixture`."""
    if "by_task" not in result:
        return [result]
    shared = {key: value for key, value in result.items() if key != "by_task"}
    return [{**shared, **scores, "task": task, "eval_task": task, "mixture": result["task"]}
            for task, scores in result["by_task"].items()]


def anchor_label(result: dict[str, Any]) -> str:
    """How a run's size is labelled in tables: its anchor, "r<rank>" for an explicit rank, else the method ("full",
    "zero-shot")."""
    if result["method"] in UNANCHORED:
        return result["method"]
    return result["anchor"] if result["anchor"] is not None else f"r{result['knobs']['r']}"


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Cells (mean and std over seeds, in pp), the tie band, verdicts, retention and baselines."""
    cells = cell_table(results)
    band = tie_band(cells)
    # A tuning grid has several learning rates per (task, method, anchor): no single accuracy to compare.
    one_lr = len({_variant(cell) for cell in cells}) == len(cells)
    return {
        "cells": cells,
        "tie_band": band,
        "verdicts": verdicts(cells, band["band_pp"]) if one_lr else [],
        "retention": retention(cells) if one_lr else [],
        "order_spread": order_spread(cells),
        "baselines": {result["task"]: 100 * result["majority_baseline"] for result in results},
        "zero_shot": {cell["task"]: cell["mean"] for cell in cells if cell["method"] == ZERO_SHOT},
        "task_titles": {task: task_title(task) for task in sorted({cell["task"] for cell in cells})},
    }


def _variant(cell: dict[str, Any]) -> tuple:
    """What tells cells apart at one learning rate: task, method, anchor and GFA's module order."""
    return cell["task"], cell["method"], cell["anchor"], cell["module_order"]


def choose_learning_rates(cells: Sequence[dict[str, Any]], per_anchor: bool = False, rule: str = "dev",
                          band: float = PAPER_TIE_BAND) -> dict[str, dict[str, Any]]:
    """Each method's learning rate by `rule` over the tasks and anchors (each anchor on its own with `per_anchor`:
    then the method's "lr" maps anchor labels to rates, and "by_anchor" holds each anchor's choice; full
    fine-tuning, which has no anchor, keeps one rate), ties to the
    smaller rate, with every rate's mean accuracy and final loss beside it.

    The rates are compared on the cells (task, anchor, module order) that every one of them was tried on: a
    folder extended with a rate at another anchor would otherwise compare averages over different cells.
    `cells_compared` counts them (`cells_tried` the cells any rate was tried on); with none shared, every rate's
    own cells are averaged (and it is 0). `rule` is one of LR_CHOICE_RULES."""
    if rule not in LR_CHOICE_RULES:
        raise ValueError(f"unknown rule {rule!r} for choosing a learning rate; known: {', '.join(LR_CHOICE_RULES)}")
    groups: dict[tuple[str, str | None], dict[float, dict[tuple, dict[str, Any]]]] = {}
    for cell in cells:
        group = (cell["method"], cell["anchor"] if per_anchor and cell["method"] not in UNANCHORED else None)
        groups.setdefault(group, {}).setdefault(cell["lr"], {})[_variant(cell)] = cell
    choices: dict[str, dict[str, Any]] = {}
    for (method, anchor), by_lr in groups.items():
        choice = _choose(by_lr, rule, band)
        if anchor is None:  # one rate for the method (always so for full fine-tuning, which has no anchor)
            choices[method] = choice
        else:
            entry = choices.setdefault(method, {"lr": {}, "by_anchor": {}})
            entry["lr"][anchor], entry["by_anchor"][anchor] = choice["lr"], choice
    return choices


def _choose(by_lr: dict[float, dict[tuple, dict[str, Any]]], rule: str, band: float) -> dict[str, Any]:
    shared = set.intersection(*(set(by_cell) for by_cell in by_lr.values()))

    def mean_of(key: str) -> dict[float, float | None]:
        values = {lr: [by_cell[variant].get(key) for variant in (shared or by_cell)] for lr, by_cell in by_lr.items()}
        return {lr: None if None in found else statistics.fmean(found) for lr, found in sorted(values.items())}

    means, losses = mean_of("mean"), mean_of("final_loss")
    best = max(means, key=lambda lr: (means[lr], -lr))
    if rule == "loss":
        fitting = [lr for lr in means if means[lr] >= means[best] - band and losses[lr] is not None]
        best = min(fitting, key=lambda lr: (losses[lr], lr)) if fitting else best
    return {"lr": best, "mean_by_lr": means, "loss_by_lr": losses, "cells_compared": len(shared),
            "cells_tried": len(set().union(*by_lr.values()))}


def cell_table(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, method, anchor, learning rate, module order): accuracy mean, sample std (None for one
    seed), seeds. The module order is None for GFA in the model's order (and for every other method)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for result in results:
        key = (result["task"], result["method"], anchor_label(result), result["lr"],
               result["knobs"].get("module_order"))
        groups.setdefault(key, []).append(result)
    cells = []
    for (task, method, anchor, lr, module_order), members in groups.items():
        members.sort(key=lambda result: result["seed"])
        values = [100 * result["accuracy"] for result in members]
        cells.append({
            "task": task, "method": method, "anchor": anchor, "lr": lr, "module_order": module_order,
            "adapter_params": members[0]["adapter_params"], "rank": members[0]["knobs"].get("r"), "n": len(values),
            "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "final_loss": _mean_final_loss(members),
            "values": {f"s{result['seed']}": value for result, value in zip(members, values, strict=True)},
            **{f"{metric}_mean": 100 * statistics.fmean(result[metric] for result in members)
               for metric in ("f1", "matthews") if metric in members[0]},
        })
    # Methods in a fixed order, GFA first, as the paper's tables list them (not alphabetically).
    return sorted(cells, key=lambda cell: (cell["task"], METHODS.index(cell["method"]), str(cell["module_order"]),
                                           cell["adapter_params"], cell["lr"]))


def _mean_final_loss(members: Sequence[dict[str, Any]]) -> float | None:
    """The seeds' mean final training loss (`run.final_train_loss`), None when a run has none (zero-shot)."""
    losses = [result.get("final_train_loss") for result in members]
    return None if None in losses else statistics.fmean(losses)


def tie_band(cells: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """+/- 2 x the pooled seed std over cells with >= 2 seeds; the paper's 1.4pp when there is none."""
    pooled = [cell for cell in cells if cell["n"] > 1]
    if not pooled:
        return {"band_pp": PAPER_TIE_BAND, "pooled_std_pp": None, "cells_pooled": 0,
                "source": f"the paper's (2 x its pooled seed std of 0.7pp), since no cell here has two or more "
                          f"seeds; the README's +/-{README_TIE_BAND}pp is 2 x the pooled seed std of its 3-seed sweep"}
    degrees = sum(cell["n"] - 1 for cell in pooled)
    pooled_std = math.sqrt(sum((cell["n"] - 1) * cell["std"] ** 2 for cell in pooled) / degrees)
    return {"band_pp": 2 * pooled_std, "pooled_std_pp": pooled_std, "cells_pooled": len(pooled),
            "source": f"2 x pooled seed std over {len(pooled)} cells ({degrees} degrees of freedom)"}


def verdicts(cells: Sequence[dict[str, Any]], band: float, method: str = "gfa",
             rival: str = "dora") -> list[dict[str, Any]]:
    """GFA (in each module order) against DoRA at every (task, anchor) where both ran: win, tie (|gap| <= band)
    or loss."""
    means = {_variant(cell): cell for cell in cells}
    rows = []
    for (task, name, anchor, module_order), ours in means.items():
        theirs = means.get((task, rival, anchor, None))
        if name != method or theirs is None:
            continue
        gap = ours["mean"] - theirs["mean"]
        outcome = "win" if gap > band else "loss" if gap < -band else "tie"
        rows.append({"task": task, "anchor": anchor, "module_order": module_order, method: ours["mean"],
                     rival: theirs["mean"], "gap_pp": gap, "verdict": outcome})
    return rows


def retention(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each (task, method, module order) with both anchors: accuracy at "1/2" as a fraction of accuracy at "16"."""
    means = {_variant(cell): cell["mean"] for cell in cells}
    rows = []
    for (task, method, anchor, module_order), low in means.items():
        high = means.get((task, method, RETENTION_TO, module_order))
        if anchor == RETENTION_FROM and high is not None:
            rows.append({"task": task, "method": method, "module_order": module_order, "from": RETENTION_FROM,
                         "to": RETENTION_TO, "accuracy_from": low, "accuracy_to": high, "retention": low / high,
                         "drop_pp": high - low})
    return rows


def order_spread(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Where GFA ran in several module orders at a (task, anchor, lr): the spread of the orders' mean accuracies
    (sample std and range) beside the seed spread within them (pooled seed std), the permutation diagnostic."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for cell in cells:
        if cell["method"] == "gfa":
            groups.setdefault((cell["task"], cell["anchor"], cell["lr"]), []).append(cell)
    rows = []
    for (task, anchor, lr), members in groups.items():
        if len(members) < 2:
            continue
        means = [cell["mean"] for cell in members]
        rows.append({"task": task, "anchor": anchor, "lr": lr,
                     "orders": {str(cell["module_order"] or "model"): cell["mean"] for cell in members},
                     "order_std_pp": statistics.stdev(means), "order_range_pp": max(means) - min(means),
                     "seed_std_pp": tie_band(members)["pooled_std_pp"]})
    return rows


def cells_csv(cells: Sequence[dict[str, Any]]) -> str:
    """The cells as CSV: task, method, module_order, anchor, lr, adapter_params, n, mean, std, then one column per
    seed."""
    seeds = sorted({seed for cell in cells for seed in cell["values"]}, key=lambda seed: int(seed[1:]))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["task", "method", "module_order", "anchor", "lr", "adapter_params", "n", "mean", "std",
                     "final_loss", *seeds])
    for cell in cells:
        writer.writerow([cell["task"], cell["method"], "" if cell["module_order"] is None else cell["module_order"],
                         cell["anchor"], cell["lr"], cell["adapter_params"], cell["n"],
                         f"{cell['mean']:.2f}", "" if cell["std"] is None else f"{cell['std']:.2f}",
                         "" if cell.get("final_loss") is None else f"{cell['final_loss']:.4f}",
                         *(f"{cell['values'][seed]:.2f}" if seed in cell["values"] else "" for seed in seeds)])
    return buffer.getvalue()


def format_summary(summary: dict[str, Any]) -> str:
    """The cells, the tie band, the verdicts, the retention and the module-order spread as plain-text tables."""
    lines = [text_table(["task", "method", "anchor", "adapter params", "accuracy %", "std", "seeds", "final loss"],
                    [[cell["task"], method_label(cell), cell["anchor"], f"{cell['adapter_params']:,}",
                      f"{cell['mean']:.1f}", "-" if cell["std"] is None else f"{cell['std']:.1f}", str(cell["n"]),
                      "-" if cell.get("final_loss") is None else f"{cell['final_loss']:.3f}"]
                     for cell in summary["cells"]])]
    lines.append("majority-class baseline: " + ", ".join(
        f"{task} {value:.1f}%" for task, value in sorted(summary["baselines"].items())))
    if summary["zero_shot"]:
        lines.append("zero-shot (the pretrained model, untrained): " + ", ".join(
            f"{task} {value:.1f}%" for task, value in sorted(summary["zero_shot"].items())))
    band = summary["tie_band"]
    lines.append(f"tie band: +/-{band['band_pp']:.2f}pp, {band['source']}")
    if summary["verdicts"]:
        lines.append(text_table(["task", "anchor", "GFA %", "DoRA %", "gap pp", "verdict"],
                            [[row["task"], row["anchor"] + _order_suffix(row), f"{row['gfa']:.1f}",
                              f"{row['dora']:.1f}", f"{row['gap_pp']:+.1f}", row["verdict"]]
                             for row in summary["verdicts"]]))
    if summary["retention"]:
        lines.append(text_table(["task", "method", "acc at 1/2 %", "acc at 16 %", "retention", "change pp"],
                            [[row["task"], method_label(row), f"{row['accuracy_from']:.1f}",
                              f"{row['accuracy_to']:.1f}", f"{100 * row['retention']:.1f}%", f"{row['accuracy_from'] - row['accuracy_to']:+.1f}"]
                             for row in summary["retention"]]))
    if summary["order_spread"]:
        lines.append("GFA across module orders: std of the orders' means against the pooled seed std\n" + text_table(
            ["task", "anchor", "orders", "order std pp", "order range pp", "seed std pp"],
            [[row["task"], row["anchor"], str(len(row["orders"])), f"{row['order_std_pp']:.2f}",
              f"{row['order_range_pp']:.2f}", "-" if row["seed_std_pp"] is None else f"{row['seed_std_pp']:.2f}"]
             for row in summary["order_spread"]]))
    if "figure" in summary:
        lines.append(f"figure: {summary['figure']}")
    return "\n\n".join(lines)


def format_legend(summary: dict[str, Any]) -> str:
    """What the summary's terms mean, for a reader who has not read the paper."""
    at_half = dict.fromkeys(method_label(cell) for cell in summary["cells"] if cell["anchor"] == RETENTION_FROM)
    lines = [
        "How to read this:",
        "- anchor: a trainable-parameter budget, named by the LoRA rank whose count it equals (1 = LoRA r=1's count, "
        "4 = LoRA r=4's, ...); every method is placed at the same budget, GFA at its rank with the nearest count.",
        f"- {RETENTION_FROM}: a budget of about 0.3 x LoRA r=1, below the smallest LoRA or DoRA; reached here by "
        + (", ".join(at_half) or "no method") + ".",
        "- adapter params: trainable parameters of the adapter alone (a classification head, where the model has "
        "one, is trained by every method and left out).",
        "- tie band: GFA and DoRA tie at an anchor when their accuracies differ by no more than it (its source is "
        "given with it above); win or loss otherwise.",
    ]
    if summary["retention"]:
        lines.append(f"- retention: accuracy at the 1/2 budget as a share of accuracy at anchor {RETENTION_TO}; "
                     "change pp is the difference (negative: a drop).")
    return "\n".join(lines)


def method_label(row: dict[str, Any]) -> str:
    """The method, with GFA's module order when the run chose one: "gfa", "gfa (by_name)"."""
    return row["method"] + _order_suffix(row)


def _order_suffix(row: dict[str, Any]) -> str:
    return "" if row.get("module_order") is None else f" ({row['module_order']})"
