"""`gfa bench` results for people: console tables, a markdown report, a plot, and a summary against the targets."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gfa_peft.bench.plan import reference_anchor
from gfa_peft.io.files import ResultKind, output_folder, write_json_atomic, write_text_atomic
from gfa_peft.io.tables import text_table


@dataclass(frozen=True)
class Targets:
    """The project's efficiency goals for GFA against LoRA in one scope (None: no goal), from `targets.json`."""

    median_time: float | None = None
    worst_time: float | None = None
    worst_peak_mem: float | None = None


TARGETS_FILE = Path(__file__).with_name("targets.json")


def load_targets(path: Path = TARGETS_FILE) -> dict[str, Targets]:
    """The goals of each scope, read from `targets.json` (data shipped with the package, not code)."""
    goals = json.loads(path.read_text(encoding="utf-8"))
    return {scope: Targets(**values) for scope, values in goals.items() if scope != "about"}


BUSY_SHARE = 0.9
"""Below this share of their threads' time the steps were slowed by other jobs (see `cpu_share`)."""

COLUMNS = [
    ("method", lambda r: r["method"]),
    ("anchor", lambda r: r["anchor"]),
    ("rank", lambda r: _text(r["rank"])),
    ("trainable", lambda r: f"{r['trainable']:,}"),
    ("step s", lambda r: f"{r['step_time_s']:.3f}"),
    ("IQR", lambda r: _percent(relative_iqr(r["step_times_s"]))),
    ("tokens/s", lambda r: f"{r['tokens_per_s']:,.0f}"),
    ("CPU s", lambda r: _number(r["cpu_time_s"], ".3f")),
    ("peak MiB", lambda r: f"{r['peak_mem_mb']:,.1f}"),
    ("step MiB", lambda r: f"{r['step_mem_mb']:,.1f}"),
    ("time/LoRA", lambda r: _number(r["time_ratio_to_lora"], ".3f")),
    ("CPU/LoRA", lambda r: _number(r["cpu_time_ratio_to_lora"], ".3f")),
    ("peak/LoRA", lambda r: _number(r["mem_ratio_to_lora"], ".3f")),
    ("step mem/LoRA", lambda r: _number(r["step_mem_ratio_to_lora"], ".3f")),
]

LEGEND = (
    "step s: median wall-clock seconds of a training step (forward, backward, AdamW); IQR: interquartile range of "
    "the timed steps / median; CPU s: median process CPU seconds of a step (all threads; steadier than wall-clock "
    "time when other jobs share the machine); peak MiB: most tensor memory held during a step, weights included; "
    "step MiB: its rise above the memory held between steps. x/LoRA: the quantity over LoRA's at the same anchor, "
    "LoRA r=1's for anchor 1/2. floor: every weight frozen, gradients still flowing back to every target module."
)


def relative_iqr(values: Sequence[float]) -> float | None:
    """(third quartile - first quartile) / median: how much the timed steps of one method spread."""
    if len(values) < 2:
        return None
    first, _, third = statistics.quantiles(values, n=4, method="inclusive")
    return (third - first) / statistics.median(values)


def group_records(records: Sequence[dict]) -> dict[str, list[dict]]:
    """Records by the group they were measured in (shapes, scope and the anchor of their LoRA reference)."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        key = f"{record['shapes']} {record['scope']}, LoRA rank {reference_anchor(record['anchor'])}"
        groups.setdefault(key, []).append(record)
    return groups


def format_tables(records: Sequence[dict]) -> str:
    """One aligned table per group of records measured side by side."""
    blocks = []
    for title, members in group_records(records).items():
        table = text_table([name for name, _ in COLUMNS], [[show(record) for _, show in COLUMNS] for record in members])
        blocks.append(f"{title}:\n{table}")
    return "\n\n".join(blocks)


def summarize(records: Sequence[dict]) -> list[dict]:
    """GFA against LoRA and DoRA in each (shapes, scope): median and worst ratios over its cells."""
    summaries = []
    for shapes, scope in dict.fromkeys((record["shapes"], record["scope"]) for record in records):
        here = [record for record in records if (record["shapes"], record["scope"]) == (shapes, scope)]
        gfa = [record for record in here if record["method"] == "gfa" and record["time_ratio_to_lora"] is not None]
        if not gfa:
            continue
        dora = {record["cell"]: record for record in here if record["method"] == "dora"}
        versus_dora = [record["step_time_s"] < dora[record["cell"]]["step_time_s"]
                       for record in gfa if record["cell"] in dora]
        summary = {"shapes": shapes, "scope": scope, "cells": len(gfa)}
        for name, key in [("time", "time_ratio_to_lora"), ("cpu_time", "cpu_time_ratio_to_lora"),
                          ("mem", "mem_ratio_to_lora"), ("step_mem", "step_mem_ratio_to_lora")]:
            summary[f"median_{name}_ratio"], summary[f"worst_{name}_ratio"] = _median_and_worst(gfa, key)
        summary.update(faster_than_dora=sum(versus_dora), cells_with_dora=len(versus_dora))
        summaries.append(summary)
    return summaries


def _median_and_worst(records: Sequence[dict], key: str) -> tuple[float | None, float | None]:
    values = [record[key] for record in records if record[key] is not None]
    return (statistics.median(values), max(values)) if values else (None, None)


def cpu_share(records: Sequence[dict]) -> float | None:
    """The median over all timed CPU steps of CPU seconds / (wall seconds x threads): about 1 on an idle machine,
    lower when other jobs took the cores (the wall-clock times then measure them too). None without CPU times."""
    shares = [cpu / (wall * record["threads"]) for record in records if record["cpu_times_s"]
              for wall, cpu in zip(record["step_times_s"], record["cpu_times_s"])]
    return statistics.median(shares) if shares else None


def format_summary(records: Sequence[dict]) -> str:
    """One line per (shapes, scope), each ratio beside its target (targets are set for Llama-3.2-3B shapes),
    and how much of the cores the steps got."""
    lines = []
    for summary in summarize(records):
        targets = load_targets().get(summary["scope"], Targets())
        parts = [
            f"step time median {_against(summary['median_time_ratio'], targets.median_time)}",
            f"worst {_against(summary['worst_time_ratio'], targets.worst_time)}",
        ]
        if summary["median_cpu_time_ratio"] is not None:
            parts.append(f"CPU time median {summary['median_cpu_time_ratio']:.3f}, "
                         f"worst {summary['worst_cpu_time_ratio']:.3f}")
        parts += [
            f"peak memory worst {_against(summary['worst_mem_ratio'], targets.worst_peak_mem)}",
            f"step memory worst {summary['worst_step_mem_ratio']:.3f}",
        ]
        if summary["cells_with_dora"]:
            parts.append(f"faster than DoRA in {summary['faster_than_dora']}/{summary['cells_with_dora']} cells")
        cells = f"{summary['cells']} cell{'s' * (summary['cells'] > 1)}"
        lines.append(f"GFA/LoRA on {summary['shapes']} {summary['scope']} ({cells}): " + "; ".join(parts))
    share = cpu_share(records)
    if share is not None:
        lines.append(
            f"The steps got {100 * share:.0f}% of their threads' time (median)"
            + (": other jobs were using the cores, so wall-clock times are inflated and noisy; the CPU-time ratios "
               "are the steadier reading" if share < BUSY_SHARE else "")
        )
    return "\n".join(lines)


def markdown_report(records: Sequence[dict], run_line: str) -> str:
    """The results as markdown: the run, the summary, one table of every record, the legend."""
    header = ["cell", *(name for name, _ in COLUMNS)]
    rows = [[record["cell"], *(show(record) for _, show in COLUMNS)] for record in records]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    summary = format_summary(records)
    return "\n".join([
        "# gfa bench", "", run_line, "",
        "## Summary", "", *(f"- {line}" for line in summary.splitlines()), "",
        "## Results", "", *table, "", LEGEND, "",
    ])


def plot_ratios(records: Sequence[dict], path: Path) -> None:
    """Step time (wall and, on CPU, CPU time) and peak memory over LoRA's, per cell, for GFA, DoRA and the floor,
    with the targets marked."""
    from gfa_peft.io.plots import plt, save_figure  # matplotlib loads (with Agg) only when a plot is drawn

    cells = list(dict.fromkeys(record["cell"] for record in records if record["time_ratio_to_lora"] is not None))
    # "llama-3.2-3b, q+v, anchor 1/2" rather than the cell key "llama-3.2-3b/q+v/1/2", whose anchor reads as a path
    cell_labels = {record["cell"]: f"{record['shapes']}, {record['scope']}, anchor {record['anchor']}"
                   for record in records}
    scopes = {record["scope"] for record in records}  # only the targets of the scopes measured
    time_targets = _target_lines("median_time", scopes) + _target_lines("worst_time", scopes)
    panels = [("time_ratio_to_lora", "step time / LoRA's", time_targets)]
    if any(record["cpu_time_ratio_to_lora"] is not None for record in records):
        panels.append(("cpu_time_ratio_to_lora", "CPU time / LoRA's", time_targets))
    panels.append(("mem_ratio_to_lora", "peak memory / LoRA's", _target_lines("worst_peak_mem", scopes)))
    figure, axes = plt.subplots(1, len(panels), figsize=(len(panels) * max(4, 0.55 * len(cells) + 2), 5), squeeze=False)
    styles = {"gfa": ("o", "tab:blue", "GFA"), "dora": ("s", "tab:orange", "DoRA (PEFT)"),
              "floor": ("_", "tab:gray", "floor")}
    for panel, (key, title, targets) in zip(axes[0], panels):
        for method, (marker, color, label) in styles.items():
            points = [(cells.index(r["cell"]), r[key]) for r in records
                      if r["method"] == method and r["cell"] in cells and r[key] is not None]
            if points:
                panel.scatter(*zip(*points), marker=marker, color=color, label=label, s=60, zorder=3)
        panel.axhline(1.0, color="black", linewidth=1, label="LoRA")
        for value, label, side in targets:
            panel.axhline(value, color="tab:red", linestyle=":", linewidth=1)
            panel.annotate(label, (1.0, value), xycoords=("axes fraction", "data"), ha="right", va=side,
                           fontsize=7, color="tab:red")
        panel.set_title(title)
        panel.set_xticks(range(len(cells)), [cell_labels[cell] for cell in cells], rotation=60, ha="right",
                         fontsize=7)
        panel.margins(x=0.2)  # the first and last cells' points off the frame
        panel.grid(axis="y", alpha=0.3)
    # beside the last panel, where it covers no point
    axes[0][-1].legend(*axes[0][0].get_legend_handles_labels(), fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1),
                       borderaxespad=0)
    figure.suptitle("gfa bench: paired against PEFT's LoRA at the same anchor (anchor 1/2 against LoRA r=1)")
    save_figure(figure, path)


def _target_lines(goal: str, scopes: set[str]) -> list[tuple[float, str, str]]:
    """(value, label, label side) of the target `goal` of each scope in `scopes`; median labels go below their
    line, apart from the worst-cell ones just above."""
    word = goal.split("_")[0]
    side = "top" if word == "median" else "bottom"
    return [(getattr(targets, goal), f"{scope} {word} target", side)
            for scope, targets in load_targets().items() if scope in scopes and getattr(targets, goal) is not None]


OUTPUT_FILES = ("results.json", "results.md", "plot.png", "config.json")
BENCH = ResultKind("bench result", is_own=lambda folder: {path.name for path in folder.iterdir()} <= set(OUTPUT_FILES),
                   is_finished=lambda folder: (folder / OUTPUT_FILES[0]).is_file())
"""A bench folder holds only its output files; a new bench (or a later group of this one) replaces them."""


def write_outputs(folder: Path, records: Sequence[dict], run_config: dict, run_line: str) -> list[Path]:
    """results.json, results.md, plot.png and config.json in `folder`, all replaced together
    (`io.files.output_folder`); a folder of other files raises OutputRefused."""
    with output_folder(folder, BENCH, overwrite=True) as building:
        write_json_atomic(building / OUTPUT_FILES[0], list(records))
        write_text_atomic(building / OUTPUT_FILES[1], markdown_report(records, run_line))
        plot_ratios(records, building / OUTPUT_FILES[2])
        write_json_atomic(building / OUTPUT_FILES[3], run_config)
    return [folder / name for name in OUTPUT_FILES]


def _against(value: float, target: float | None) -> str:
    if target is None:
        return f"{value:.3f}"
    return f"{value:.3f} (target <= {target}: {'met' if value <= target else 'MISSED'})"


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _text(value) -> str:
    return "-" if value is None else str(value)
