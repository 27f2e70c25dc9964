"""`gfa bench` results for people: console tables, a markdown report, a plot, and a summary against the targets."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gfa_peft.bench.plan import reference_anchor
from gfa_peft.io.files import ResultKind, output_folder, write_json_atomic, write_text_atomic
from gfa_peft.io.tables import text_table


@dataclass(frozen=True)
class Targets:
    """The project's training goals for GFA in one scope, from `targets.json`: ratios to LoRA (None: no goal),
    and whether GFA must be faster than DoRA in every cell."""

    median_time: float | None = None
    worst_time: float | None = None
    worst_peak_mem: float | None = None
    faster_than_dora: bool = False


@dataclass(frozen=True)
class InferenceTargets:
    """The inference goals, in every cell: GFA unmerged's decode time per token over LoRA unmerged's at most
    `decode_vs_lora`; GFA merged's over the bare model's equal to `merged_decode_vs_base` within the noise."""

    decode_vs_lora: float
    merged_decode_vs_base: float


TARGETS_FILE = Path(__file__).with_name("targets.json")


def load_targets(path: Path = TARGETS_FILE) -> dict[str, Targets]:
    """The training goals of each scope, read from `targets.json` (data shipped with the package, not code)."""
    goals = json.loads(path.read_text(encoding="utf-8"))["training"]
    return {scope: Targets(**values) for scope, values in goals.items()}


def load_inference_targets(path: Path = TARGETS_FILE) -> InferenceTargets:
    return InferenceTargets(**json.loads(path.read_text(encoding="utf-8"))["inference"])


BUSY_SHARE = 0.9
"""Below this share of their threads' time the steps were slowed by other jobs (see `cpu_share`)."""

Column = tuple[str, Callable[[dict], str]]

RUN_COLUMNS: list[Column] = [
    ("method", lambda r: r["method"]),
    ("anchor", lambda r: r["anchor"]),
    ("rank", lambda r: _text(r["rank"])),
]
"""What names a record's run, first in both benches' tables."""

COLUMNS: list[Column] = [
    *RUN_COLUMNS,
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
    ("time/DoRA", lambda r: _number(r["time_ratio_to_dora"], ".3f")),
]

LEGEND = (
    "step s: median wall-clock seconds of a training step (forward, backward, AdamW); IQR: interquartile range of "
    "the timed steps / median; CPU s: median process CPU seconds of a step (all threads; steadier than wall-clock "
    "time when other jobs share the machine); peak MiB: most tensor memory held during a step, weights included; "
    "step MiB: its rise above the memory held between steps. x/LoRA: the quantity over LoRA's at the same anchor, "
    "LoRA r=1's for anchor 1/2; time/DoRA: step time over DoRA's (below 1: faster). floor: every weight frozen, "
    "gradients still flowing back to every target module. wgrad (weight-gradient floor): the floor plus every target "
    "module's weight gradient, computed and dropped: the least work of an exact GFA gradient."
)

INFERENCE_COLUMNS: list[Column] = [
    *RUN_COLUMNS,
    ("batch", lambda r: str(r["batch_size"])),
    ("prefill s", lambda r: f"{r['prefill_s']:.3f}"),
    ("prefill tok/s", lambda r: f"{r['prefill_tokens_per_s']:,.0f}"),
    ("decode ms", lambda r: f"{1000 * r['decode_s']:.1f}"),
    ("IQR", lambda r: _percent(relative_iqr(r["decode_times_s"]))),
    ("decode tok/s", lambda r: f"{r['decode_tokens_per_s']:,.1f}"),
    ("CPU ms", lambda r: "-" if r["decode_cpu_s"] is None else f"{1000 * r['decode_cpu_s']:.1f}"),
    ("resting MiB", lambda r: f"{r['resting_mem_mb']:,.1f}"),
    ("peak MiB", lambda r: f"{r['peak_mem_mb']:,.1f}"),
    ("decode/LoRA", lambda r: _number(r["decode_ratio_to_lora"], ".3f")),
    ("CPU/LoRA", lambda r: _number(r["decode_cpu_ratio_to_lora"], ".3f")),
    ("decode/base", lambda r: _number(r["decode_ratio_to_base"], ".3f")),
    ("CPU/base", lambda r: _number(r["decode_cpu_ratio_to_base"], ".3f")),
    ("prefill/base", lambda r: _number(r["prefill_ratio_to_base"], ".3f")),
    ("peak/base", lambda r: _number(r["mem_ratio_to_base"], ".3f")),
]

INFERENCE_LEGEND = (
    "A timed call is one greedy `generate` of new_tokens tokens after a prompt of prompt_len random tokens, per "
    "sequence of the batch. prefill s: median seconds of the prompt's forward; decode ms: median milliseconds of "
    "one decode forward (one new token per sequence; the mean over a call's decode forwards); IQR: interquartile "
    "range of the calls' decode times / median; decode tok/s: batch / decode time; CPU ms: the decode forward's "
    "process CPU time (all threads). resting MiB: tensor memory held between calls (weights, adapters, and what an "
    "implementation keeps for reuse); peak MiB: the most held during a call. x/LoRA, x/base: over LoRA unmerged's, "
    "over the bare model's, same batch. base: no adapter; lora, gfa: adapters unmerged, factors drawn at random; "
    "gfa-merged: GFA merged into the weights (merge_adapter)."
)


def relative_iqr(values: Sequence[float]) -> float | None:
    """(third quartile - first quartile) / median: how much the timed steps of one method spread."""
    if len(values) < 2:
        return None
    first, _, third = statistics.quantiles(values, n=4, method="inclusive")
    return (third - first) / statistics.median(values)


def group_title(record: dict) -> str:
    """The group a record was measured in: shapes, scope, the anchor of its LoRA reference (and its batch size in
    the inference bench)."""
    title = f"{record['shapes']} {record['scope']}, LoRA rank {reference_anchor(record['anchor'])}"
    return title + (f", batch {record['batch_size']}" if _is_inference(record) else "")


def group_records(records: Sequence[dict]) -> dict[str, list[dict]]:
    """Records by the group they were measured in."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(group_title(record), []).append(record)
    return groups


def format_tables(records: Sequence[dict]) -> str:
    """One aligned table per group of records measured side by side."""
    columns = _columns(records)
    blocks = []
    for title, members in group_records(records).items():
        table = text_table([name for name, _ in columns], [[show(record) for _, show in columns] for record in members])
        blocks.append(f"{title}:\n{table}")
    return "\n\n".join(blocks)


def summarize(records: Sequence[dict]) -> list[dict]:
    """GFA against LoRA and DoRA in each (shapes, scope) of a training bench: median and worst ratios over its
    cells, and the cells where GFA was not faster than DoRA."""
    summaries = []
    for shapes, scope in dict.fromkeys((record["shapes"], record["scope"]) for record in records):
        here = [record for record in records if (record["shapes"], record["scope"]) == (shapes, scope)]
        gfa = [record for record in here if record["method"] == "gfa" and record["time_ratio_to_lora"] is not None]
        if not gfa:
            continue
        versus_dora = {record["cell"]: record["time_ratio_to_dora"] < 1
                       for record in gfa if record["time_ratio_to_dora"] is not None}
        summary = {"shapes": shapes, "scope": scope, "cells": len(gfa)}
        for name, key in [("time", "time_ratio_to_lora"), ("cpu_time", "cpu_time_ratio_to_lora"),
                          ("mem", "mem_ratio_to_lora"), ("step_mem", "step_mem_ratio_to_lora")]:
            summary[f"median_{name}_ratio"], summary[f"worst_{name}_ratio"] = _median_and_worst(gfa, key)
        summary.update(faster_than_dora=sum(versus_dora.values()), cells_with_dora=len(versus_dora),
                       slower_than_dora=[cell for cell, faster in versus_dora.items() if not faster])
        summary.update(_against_weight_gradient_floor(here, gfa))
        summaries.append(summary)
    return summaries


def _against_weight_gradient_floor(here: Sequence[dict], gfa: Sequence[dict]) -> dict:
    """Where the weight-gradient floor was measured: GFA's step time over it (GFA's own overhead beyond the weight
    gradients its exact gradient needs), and its step time over DoRA's (at or above 1, no method that needs those
    weight gradients can be faster than DoRA in that cell), medians over the cells."""
    floors = {record["reference"]: record for record in here if record["method"] == "wgrad"}
    over_floor = [record["time_ratio_to_lora"] / floors[record["reference"]]["time_ratio_to_lora"]
                  for record in gfa if record["reference"] in floors]
    floor_over_dora = [floor["time_ratio_to_dora"] for floor in floors.values()
                       if floor["time_ratio_to_dora"] is not None]
    return {"median_time_over_wgrad": statistics.median(over_floor) if over_floor else None,
            "median_wgrad_over_dora": statistics.median(floor_over_dora) if floor_over_dora else None}


def _median_and_worst(records: Sequence[dict], key: str) -> tuple[float | None, float | None]:
    values = [record[key] for record in records if record[key] is not None]
    return (statistics.median(values), max(values)) if values else (None, None)


def cpu_share(records: Sequence[dict]) -> float | None:
    """The median over all timed CPU steps (decode forwards in the inference bench) of CPU seconds / (wall seconds x
    threads): about 1 on an idle machine, lower when other jobs took the cores (the wall-clock times then measure
    them too). None without CPU times."""
    wall_key, cpu_key = ("decode_times_s", "decode_cpu_times_s") if _is_inference(records[0]) else \
        ("step_times_s", "cpu_times_s")
    shares = [cpu / (wall * record["threads"]) for record in records if record[cpu_key]
              for wall, cpu in zip(record[wall_key], record[cpu_key])]
    return statistics.median(shares) if shares else None


def format_summary(records: Sequence[dict]) -> str:
    """The summary of a training or an inference bench, each ratio beside its target, and how much of the cores
    the steps got."""
    lines = format_inference_checks(records) if _is_inference(records[0]) else _training_lines(records)
    share = cpu_share(records)
    if share is not None:
        lines.append(
            f"The steps got {100 * share:.0f}% of their threads' time (median)"
            + (": other jobs were using the cores, so wall-clock times are inflated and noisy; the CPU-time ratios "
               "are the steadier reading" if share < BUSY_SHARE else "")
        )
    return "\n".join(lines)


def _training_lines(records: Sequence[dict]) -> list[str]:
    """One line per (shapes, scope) against the training targets (set for Llama-3.2-3B shapes)."""
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
            versus = f"faster than DoRA in {summary['faster_than_dora']}/{summary['cells_with_dora']} cells"
            if targets.faster_than_dora:
                missed = summary["slower_than_dora"]
                versus += (" (target: every cell: " + ("met)" if not missed else f"MISSED in {', '.join(missed)})"))
            parts.append(versus)
        if summary["median_time_over_wgrad"] is not None:
            parts.append(f"over the weight-gradient floor median {summary['median_time_over_wgrad']:.3f}")
        if summary["median_wgrad_over_dora"] is not None:
            parts.append(f"the weight-gradient floor itself over DoRA median {summary['median_wgrad_over_dora']:.3f}"
                         + (" (at or above 1: no exact-gradient method is faster than DoRA here)"
                            if summary["median_wgrad_over_dora"] >= 1 else ""))
        cells = f"{summary['cells']} cell{'s' * (summary['cells'] > 1)}"
        lines.append(f"GFA/LoRA on {summary['shapes']} {summary['scope']} ({cells}): " + "; ".join(parts))
    return lines


def inference_checks(records: Sequence[dict]) -> list[dict]:
    """Each (cell, batch size) of an inference bench against the inference targets: GFA unmerged's decode time per
    token over LoRA unmerged's, GFA merged's over the bare model's with the noise allowed (the larger relative IQR
    of the two methods' decode times), whether each is met, and whether GFA merged generated the same tokens as GFA
    unmerged (None where a method is missing)."""
    targets = load_inference_targets()
    by_key = {(record["cell"], record["batch_size"], record["method"]): record for record in records}
    checks = []
    for cell, batch_size in dict.fromkeys((record["cell"], record["batch_size"]) for record in records):
        gfa, merged, base = (by_key.get((cell, batch_size, method)) for method in ("gfa", "gfa-merged", "base"))
        check = {"cell": cell, "batch_size": batch_size, "decode_vs_lora": gfa and gfa["decode_ratio_to_lora"],
                 "cpu_decode_vs_lora": gfa and gfa["decode_cpu_ratio_to_lora"],
                 "merged_vs_base": merged and merged["decode_ratio_to_base"],
                 "cpu_merged_vs_base": merged and merged["decode_cpu_ratio_to_base"]}
        check["decode_vs_lora_met"] = (None if check["decode_vs_lora"] is None
                                       else check["decode_vs_lora"] <= targets.decode_vs_lora)
        noise = max(relative_iqr(merged["decode_times_s"]) or 0, relative_iqr(base["decode_times_s"]) or 0) \
            if merged and base else None
        check["noise"] = noise
        check["merged_vs_base_met"] = (None if check["merged_vs_base"] is None
                                       else abs(check["merged_vs_base"] - targets.merged_decode_vs_base) <= noise)
        check["same_tokens"] = gfa["generated"] == merged["generated"] if gfa and merged else None
        if any(check[key] is not None for key in ("decode_vs_lora", "merged_vs_base")):
            checks.append(check)
    return checks


def format_inference_checks(records: Sequence[dict]) -> list[str]:
    targets = load_inference_targets()
    lines = []
    for check in inference_checks(records):
        parts = []
        if check["decode_vs_lora"] is not None:
            parts.append(f"GFA/LoRA unmerged decode {check['decode_vs_lora']:.3f} (target <= {targets.decode_vs_lora}: "
                         f"{_met(check['decode_vs_lora_met'])})" + _cpu_reading(check["cpu_decode_vs_lora"]))
        if check["merged_vs_base"] is not None:
            parts.append(f"GFA merged/base decode {check['merged_vs_base']:.3f} (target {targets.merged_decode_vs_base}"
                         f" within noise {100 * check['noise']:.1f}%: {_met(check['merged_vs_base_met'])})"
                         + _cpu_reading(check["cpu_merged_vs_base"]))
        if check["same_tokens"] is not None:
            parts.append("GFA merged and unmerged generated " + ("the same tokens" if check["same_tokens"]
                                                                 else "DIFFERENT tokens"))
        lines.append(f"{check['cell']} batch {check['batch_size']}: " + "; ".join(parts))
    return lines


def _cpu_reading(ratio: float | None) -> str:
    """The CPU-time reading of a ratio, steadier than wall-clock time on a busy machine (nothing on CUDA)."""
    return "" if ratio is None else f", CPU time {ratio:.3f}"


def markdown_report(records: Sequence[dict], run_line: str) -> str:
    """The results as markdown: the run, the summary, one table of every record, the legend."""
    columns = _columns(records)
    header = ["cell", *(name for name, _ in columns)]
    rows = [[record["cell"], *(show(record) for _, show in columns)] for record in records]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    summary = format_summary(records)
    inference = _is_inference(records[0])
    return "\n".join([
        "# gfa bench" + (" --inference" if inference else ""), "", run_line, "",
        "## Summary", "", *(f"- {line}" for line in summary.splitlines()), "",
        "## Results", "", *table, "", INFERENCE_LEGEND if inference else LEGEND, "",
    ])


def plot_ratios(records: Sequence[dict], path: Path) -> None:
    """Training: step time (wall and, on CPU, CPU time) and peak memory over LoRA's, per cell, for GFA, DoRA and
    the floor. Inference: decode time over LoRA unmerged's and over the bare model's, and peak memory over the bare
    model's, per cell and batch size. The targets are marked."""
    if _is_inference(records[0]):
        inference = load_inference_targets()
        panels = [("decode_ratio_to_lora", "decode time / LoRA unmerged's",
                   [(inference.decode_vs_lora, "GFA target", "bottom")], "LoRA"),
                  ("decode_ratio_to_base", "decode time / bare model's",
                   [(inference.merged_decode_vs_base, "GFA merged target", "top")], "base"),
                  ("mem_ratio_to_base", "peak memory / bare model's", [], "base")]
        styles = {"gfa": ("o", "tab:blue", "GFA unmerged"), "gfa-merged": ("D", "tab:green", "GFA merged"),
                  "lora": ("s", "tab:orange", "LoRA unmerged"), "base": ("_", "tab:gray", "bare model")}
        title = "gfa bench --inference: greedy generation, paired in alternating rounds"
    else:
        scopes = {record["scope"] for record in records}  # only the targets of the scopes measured
        time_targets = _target_lines("median_time", scopes) + _target_lines("worst_time", scopes)
        panels = [("time_ratio_to_lora", "step time / LoRA's", time_targets, "LoRA")]
        if any(record["cpu_time_ratio_to_lora"] is not None for record in records):
            panels.append(("cpu_time_ratio_to_lora", "CPU time / LoRA's", time_targets, "LoRA"))
        panels.append(("mem_ratio_to_lora", "peak memory / LoRA's", _target_lines("worst_peak_mem", scopes), "LoRA"))
        styles = {"gfa": ("o", "tab:blue", "GFA"), "gfa-gain": ("^", "tab:cyan", "GFA, module gains"),
                  "dora": ("s", "tab:orange", "DoRA (PEFT)"),
                  "floor": ("_", "tab:gray", "floor"), "wgrad": ("x", "tab:purple", "weight-gradient floor")}
        title = "gfa bench: paired against PEFT's LoRA at the same anchor (anchor 1/2 against LoRA r=1)"
    _plot_panels(records, panels, styles, title, path)


def _plot_panels(records: Sequence[dict], panels: list[tuple[str, str, list[tuple[float, str, str]], str]],
                 styles: dict[str, tuple[str, str, str]], title: str, path: Path) -> None:
    """One panel per (ratio key, title, target lines, name of the line at 1), the records' ratios per cell (and
    batch size, where the records have more than one) in each method's (marker, color, label)."""
    from gfa_peft.io.plots import plt, save_figure  # matplotlib loads (with Agg) only when a plot is drawn

    several_batches = len({record["batch_size"] for record in records}) > 1

    def label(record: dict) -> str:
        # "llama-3.2-3b, q+v, anchor 1/2" rather than the cell key "llama-3.2-3b/q+v/1/2", whose anchor reads as a path
        return (f"{record['shapes']}, {record['scope']}, anchor {record['anchor']}"
                + (f", batch {record['batch_size']}" if several_batches else ""))

    labels = list(dict.fromkeys(label(record) for record in records
                                if any(record[key] is not None for key, *_ in panels)))
    figure, axes = plt.subplots(1, len(panels), figsize=(len(panels) * max(4, 0.55 * len(labels) + 2), 5),
                                squeeze=False)
    for panel, (key, panel_title, targets, unit_name) in zip(axes[0], panels):
        for method, (marker, color, method_label) in styles.items():
            points = [(labels.index(label(r)), r[key]) for r in records
                      if r["method"] == method and label(r) in labels and r[key] is not None]
            if points:
                panel.scatter(*zip(*points), marker=marker, color=color, label=method_label, s=60, zorder=3)
        panel.axhline(1.0, color="black", linewidth=1, label=unit_name)
        for value, target_label, side in targets:
            panel.axhline(value, color="tab:red", linestyle=":", linewidth=1)
            panel.annotate(target_label, (1.0, value), xycoords=("axes fraction", "data"), ha="right", va=side,
                           fontsize=7, color="tab:red")
        panel.set_title(panel_title)
        panel.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        panel.margins(x=0.2)  # the first and last cells' points off the frame
        panel.grid(axis="y", alpha=0.3)
    # beside the last panel, where it covers no point
    axes[0][-1].legend(*axes[0][0].get_legend_handles_labels(), fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1),
                       borderaxespad=0)
    figure.suptitle(title)
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


def _is_inference(record: dict) -> bool:
    """Whether a record is of `gfa bench --inference` (it times decoding) rather than of the training bench."""
    return "decode_s" in record


def _columns(records: Sequence[dict]) -> list[Column]:
    return INFERENCE_COLUMNS if _is_inference(records[0]) else COLUMNS


def _against(value: float, target: float | None) -> str:
    if target is None:
        return f"{value:.3f}"
    return f"{value:.3f} (target <= {target}: {'met' if value <= target else 'MISSED'})"


def _met(met: bool) -> str:
    return "met" if met else "MISSED"


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _text(value) -> str:
    return "-" if value is None else str(value)
