"""Where in training one run falls behind another: the gap between their logged training losses, window by window.

    python scripts/loss_gap.py RUN_A RUN_B [--window STEPS]

prints, for each window of logged steps, each run's mean logged loss, the gap (A - B) and the epoch the window ends
in (a window past epoch 1 trains on examples the runs have seen before). Both runs are finished `gfa train`
folders that log the same steps (the same length and logging interval). The evidence for docs/study.md's "speed or
capacity" section.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

from gfa_peft.io.tables import text_table

LOG_FILE = "train_log.json"


def logged_losses(run: Path) -> dict[int, tuple[float, float]]:
    """{step: (loss, epoch)} of every logged training loss of a run."""
    log = json.loads((run / LOG_FILE).read_text(encoding="utf-8"))
    return {entry["step"]: (entry["loss"], entry["epoch"]) for entry in log if "loss" in entry}


def windows(first: dict[int, tuple[float, float]], second: dict[int, tuple[float, float]],
            window: int) -> list[dict]:
    """Per window of `window` steps ((0, window], (window, 2 window], ...): the steps' mean losses of each run,
    their gap and the epoch at the window's last logged step."""
    if first.keys() != second.keys():
        raise ValueError("the runs log different steps: compare runs of the same length and logging interval")
    rows = []
    for end in range(window, max(first) + window, window):
        steps = [step for step in sorted(first) if end - window < step <= end]
        if steps:
            a, b = mean(first[step][0] for step in steps), mean(second[step][0] for step in steps)
            rows.append({"steps": (end - window, min(end, steps[-1])), "a": a, "b": b, "gap": a - b,
                         "epoch": first[steps[-1]][1]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", type=Path, help="a finished run folder")
    parser.add_argument("run_b", type=Path, help="a finished run folder logging the same steps")
    parser.add_argument("--window", type=int, default=50, help="steps a row averages over (default: 50)")
    args = parser.parse_args()
    if args.window < 1:
        raise SystemExit("--window must be at least 1")
    rows = windows(logged_losses(args.run_a), logged_losses(args.run_b), args.window)
    print(f"A = {args.run_a}\nB = {args.run_b}")
    print(text_table(["steps", "A", "B", "A - B", "epoch"],
                     [[f"{row['steps'][0] + 1}-{row['steps'][1]}", f"{row['a']:.3f}", f"{row['b']:.3f}",
                       f"{row['gap']:+.3f}", f"{row['epoch']:.2f}"] for row in rows]))


if __name__ == "__main__":
    main()
