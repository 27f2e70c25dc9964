"""The sweep's figure in the style of the paper's Figure 2: accuracy against adapter-only trainable parameters
(log x), one panel per task, one line per method through its anchors (GFA's leftmost point is the "1/2"
anchor no per-module method reaches), error bars of one seed standard deviation, the majority-class baseline
dashed. Full fine-tuning, when present, is a single point at its count.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from gfa_peft.io.files import write_atomic  # noqa: E402

STYLE = {"gfa": ("GFA", "tab:red", "o"), "lora": ("LoRA", "tab:blue", "s"), "dora": ("DoRA", "tab:green", "^"),
         "vera": ("VeRA", "tab:purple", "D"), "vblora": ("VB-LoRA", "tab:orange", "v"),
         "full": ("full FT (targets)", "black", "*")}

ORDER_LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))
"""Line styles of the GFA module orders of a permutation sweep (reused after six)."""


def plot_sweep(summary: dict[str, Any], path: Path) -> None:
    """Draw the sweep summary's cells into `path` (PNG), written atomically."""
    tasks = sorted({cell["task"] for cell in summary["cells"]})
    figure, axes = plt.subplots(1, max(len(tasks), 1), figsize=(4.5 * max(len(tasks), 1), 3.6), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=False):
        for method, (label, color, marker) in STYLE.items():
            ours = [cell for cell in summary["cells"] if cell["task"] == task and cell["method"] == method]
            for order, linestyle in zip(dict.fromkeys(cell["module_order"] for cell in ours),
                                        itertools.cycle(ORDER_LINESTYLES)):
                cells = sorted((cell for cell in ours if cell["module_order"] == order),
                               key=lambda cell: cell["adapter_params"])
                axis.errorbar([cell["adapter_params"] for cell in cells], [cell["mean"] for cell in cells],
                              yerr=[cell["std"] or 0.0 for cell in cells], color=color, marker=marker,
                              label=label if order is None else f"{label} ({order})", linestyle=linestyle,
                              capsize=3, linewidth=1.5, markersize=6)
            halves = [cell for cell in ours if cell["anchor"] == "1/2"]
            if halves:  # one label under the lowest point, however many module orders share the budget
                lowest = min(halves, key=lambda cell: cell["mean"])
                axis.annotate("r=1/2", (lowest["adapter_params"], lowest["mean"]), textcoords="offset points",
                              xytext=(0, -14), ha="center", fontsize=8, color=color)
        if task in summary["baselines"]:
            axis.axhline(summary["baselines"][task], color="gray", linestyle="--", linewidth=1, label="majority class")
        axis.set_xscale("log")
        axis.set_title(task)
        axis.set_xlabel("trainable adapter parameters (head excluded)")
        axis.set_ylabel("accuracy (%)")
        axis.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_figure(figure, path)


def save_figure(figure: plt.Figure, path: Path) -> None:
    """Lay `figure` out, save it as a PNG into `path` (written atomically) and close it."""
    try:
        figure.tight_layout()
        write_atomic(path, lambda temporary: figure.savefig(temporary, dpi=120, format="png"))
    finally:
        plt.close(figure)
