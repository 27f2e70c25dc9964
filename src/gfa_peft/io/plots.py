"""The sweep's figure in the style of the paper's Figure 2: accuracy against adapter-only trainable parameters
(log x), one panel per task titled with its full name, one line per method through its anchors, each GFA point
labelled with its rank and count (its leftmost point is the "1/2" budget no per-module method reaches), error bars
of one seed standard deviation, the majority-class baseline dashed and the zero-shot accuracy (the pretrained
model, untrained) dotted. Full fine-tuning, when present, is a single point at its count.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from gfa_peft import __version__  # noqa: E402
from gfa_peft.io.files import REPORT_MARK, write_atomic  # noqa: E402

STYLE = {"gfa": ("GFA", "tab:red", "o"), "lora": ("LoRA", "tab:blue", "s"), "dora": ("DoRA", "tab:green", "^"),
         "vera": ("VeRA", "tab:purple", "D"), "vblora": ("VB-LoRA", "tab:orange", "v"),
         "full": ("full FT (targets)", "black", "*")}

LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))
"""Line styles of one method's variants: GFA's module orders in a permutation sweep, the learning rates of a tuning
sweep (reused after six)."""


def plot_sweep(summary: dict[str, Any], path: Path) -> None:
    """Draw the sweep summary's cells into `path` (PNG), written atomically."""
    tasks = sorted({cell["task"] for cell in summary["cells"]})
    figure, axes = plt.subplots(1, max(len(tasks), 1), figsize=(4.5 * max(len(tasks), 1), 3.6), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=False):
        for method, (label, color, marker) in STYLE.items():
            ours = [cell for cell in summary["cells"] if cell["task"] == task and cell["method"] == method]
            line_of = _line_key(ours)
            for line, linestyle in zip(dict.fromkeys(map(line_of, ours)), itertools.cycle(LINESTYLES)):
                order, lr = line
                cells = sorted((cell for cell in ours if line_of(cell) == line),
                               key=lambda cell: cell["adapter_params"])
                variant = label + ("" if order is None else f" ({order})") + ("" if lr is None else f", lr {lr:g}")
                axis.errorbar([cell["adapter_params"] for cell in cells], [cell["mean"] for cell in cells],
                              yerr=[cell["std"] or 0.0 for cell in cells], color=color, marker=marker,
                              label=variant, linestyle=linestyle, capsize=3, linewidth=1.5, markersize=6,
                              zorder=3 if method == "gfa" else 2)  # GFA on top where counts coincide with LoRA's
            if method == "gfa":
                others = [cell for cell in summary["cells"] if cell["task"] == task and cell["method"] != "gfa"]
                _label_gfa_points(axis, ours, others, color)
        if task in summary["baselines"]:
            axis.axhline(summary["baselines"][task], color="gray", linestyle="--", linewidth=1, label="majority class")
        if task in summary.get("zero_shot", {}):
            axis.axhline(summary["zero_shot"][task], color="black", linestyle=":", linewidth=1.2, label="zero-shot")
        log_count_axis(axis)
        axis.margins(x=0.15, y=0.22)  # room for the point labels (three lines over or under a point) inside the frame
        axis.set_title(summary.get("task_titles", {}).get(task, task))
        axis.set_xlabel("trainable adapter parameters (head excluded)")
        axis.set_ylabel("accuracy (%)")
        axis.grid(True, which="both", alpha=0.3)
    _legend_beside(figure, axes[0])
    save_figure(figure, path)


def _line_key(cells: list[dict[str, Any]]) -> Callable[[dict[str, Any]], tuple]:
    """What puts a method's cells on one line: its module order, and its rate in a tuning sweep (several rates at
    one anchor: one line per rate). A sweep with one rate per anchor (a rate tuned per anchor) draws one line."""
    tuning = len({(cell["module_order"], cell["anchor"], cell["lr"]) for cell in cells}) > len(
        {(cell["module_order"], cell["anchor"]) for cell in cells})
    return lambda cell: (cell["module_order"], cell["lr"] if tuning else None)


def log_count_axis(axis: plt.Axes) -> None:
    """A log-scale x axis of parameter counts, labelled with plain counts and none on minor ticks, whose
    "6x10^1 7x10^1 ..." collide when the counts span little."""
    axis.set_xscale("log")
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    axis.xaxis.set_minor_formatter(NullFormatter())


def _legend_beside(figure: plt.Figure, axes: Sequence[plt.Axes]) -> None:
    """One legend for every panel, right of the last one: inside a panel a tuning sweep's line per rate covered
    the points and the title. A label drawn in several panels is listed once."""
    entries: dict[str, Any] = {}
    for axis in axes:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if not entries:  # no finished run yet (another process trains them): an empty figure
        return
    figure.legend(list(entries.values()), list(entries), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
                  ncol=math.ceil(len(entries) / 16), frameon=False)


def _label_gfa_points(axis: plt.Axes, cells: list[dict[str, Any]], others: list[dict[str, Any]], color: str) -> None:
    """Each GFA budget's rank and count (one label however many module orders share the budget; the 1/2 budget
    says so, since its rank, often 1, does not): under its lowest point, or over its highest where GFA tops the
    other methods at about that count, so the label never covers their points."""
    for anchor in dict.fromkeys(cell["anchor"] for cell in cells):
        at_budget = [cell for cell in cells if cell["anchor"] == anchor]
        count = at_budget[0]["adapter_params"]
        nearby = [cell["mean"] for cell in others if 2 / 3 < cell["adapter_params"] / count < 3 / 2]
        above = bool(nearby) and max(cell["mean"] for cell in at_budget) > max(nearby)
        point = (max if above else min)(at_budget, key=lambda cell: cell["mean"])
        text = ("1/2 budget\n" if anchor == "1/2" else "") + f"r={point['rank']}\n{count:,}"
        axis.annotate(text, (count, point["mean"]), textcoords="offset points", xytext=(0, 8 if above else -8),
                      ha="center", va="bottom" if above else "top", fontsize=7, color=color)


def save_figure(figure: plt.Figure, path: Path) -> None:
    """Lay `figure` out, save it as a PNG into `path` (written atomically) and close it. The saved area grows to
    hold every label, so none is cut at the edge. The PNG carries `REPORT_MARK` as a text chunk, so a later
    `--plot` may replace it (`is_plot`) while a file of the user's is left alone."""
    metadata = {REPORT_MARK: f"gfa-peft {__version__}"}
    try:
        figure.tight_layout()
        write_atomic(path, lambda temporary: figure.savefig(temporary, dpi=120, format="png", bbox_inches="tight",
                                                            pad_inches=0.15, metadata=metadata))
    finally:
        plt.close(figure)
