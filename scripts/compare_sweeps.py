"""One method's cells in two sweep folders, side by side: the shipping rule of docs/study.md.

A new setting of a method (GFA under s = 1/sqrt(r)) and its current one (GFA at s = 1) cannot share a sweep folder
(one method under two settings would mix in one summary), so each has its own. This script reads both folders'
`results.json` and, for every (task, anchor) both ran, puts the new mean beside the old, with the verdict within
the tie band (2 x the seed std pooled over every cell of both folders, as `gfa sweep` pools its own); then the
mean over the tasks at each anchor, and whether the new setting passes the rule: a higher mean at every anchor,
and no cell lost beyond the band. The rule is judged only when every cell of the old folder was run in the new,
with as many seeds, and neither folder has unfinished runs; until then the script says what is missing.

    python scripts/compare_sweeps.py NEW OLD [--method gfa] [--json]

prints a table, or with --json the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from gfa_peft.cli import quiet_libraries
from gfa_peft.io.tables import text_table

with quiet_libraries():  # importing PEFT logs bitsandbytes' note on an optional kernel; the gfa commands hide it too
    from gfa_peft.training.sweep import tie_band, verdicts

OLD = "old"
"""The name the old folder's cells of the method take, so that `verdicts` sees two methods."""


def summary_of(folder: Path) -> dict[str, Any]:
    """A sweep's summary (results.json)."""
    path = folder / "results.json"
    if not path.is_file():
        raise SystemExit(f"{folder} holds no results.json: not a `gfa sweep` folder")
    return json.loads(path.read_text(encoding="utf-8"))


def method_cells(summary: dict[str, Any], method: str, side: str) -> dict[tuple[str, str], dict[str, Any]]:
    """`method`'s cells in the model's module order, by (task, anchor). A tuning folder (several learning rates of
    one cell) has no one accuracy to compare: refused."""
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for cell in summary["cells"]:
        if cell["method"] == method and cell["module_order"] is None:
            key = (cell["task"], cell["anchor"])
            if key in cells:
                raise SystemExit(f"the {side} folder has {method} at anchor {key[1]} on {key[0]} more than once "
                                 "(several learning rates): compare folders with one run setting per cell")
            cells[key] = cell
    return cells


def compare(new: dict[str, Any], old: dict[str, Any], method: str) -> dict[str, Any]:
    """Every (task, anchor) cell of `method` in both summaries, the means over tasks per anchor, and the rule's
    outcome. The rule is decided only on a like-for-like comparison: every cell of the old folder run in the new,
    with as many seeds, and no run of either unfinished; otherwise `incomplete` says what is missing."""
    ours, theirs = method_cells(new, method, "new"), method_cells(old, method, "old")
    band = tie_band([*new["cells"], *old["cells"]])
    rows = verdicts([*ours.values(), *({**cell, "method": OLD} for cell in theirs.values())], band["band_pp"],
                    method=method, rival=OLD)
    anchors = []
    for anchor in dict.fromkeys(row["anchor"] for row in rows):
        here = [row for row in rows if row["anchor"] == anchor]
        new_mean, old_mean = (statistics.fmean(row[side] for row in here) for side in (method, OLD))
        anchors.append({"anchor": anchor, "tasks": len(here), method: new_mean, OLD: old_mean,
                        "gap_pp": new_mean - old_mean})
    incomplete = [f"not run by the new setting: {task} at {anchor}" for task, anchor in theirs.keys() - ours.keys()]
    incomplete += [f"{task} at {anchor}: {ours[task, anchor]['n']} seed(s) new, {theirs[task, anchor]['n']} old"
                   for task, anchor in ours.keys() & theirs.keys() if ours[task, anchor]["n"] != theirs[task, anchor]["n"]]
    incomplete += [f"{len(summary.get('unfinished', []))} run(s) of the {side} folder unfinished"
                   for side, summary in (("new", new), ("old", old)) if summary.get("unfinished")]
    if not rows:
        incomplete.append(f"no (task, anchor) of {method} in both folders")
    passes = all(row["gap_pp"] > 0 for row in anchors) and not any(row["verdict"] == "loss" for row in rows)
    return {"method": method, "tie_band": band, "cells": rows, "anchors": anchors, "incomplete": sorted(incomplete),
            "passes": passes and not incomplete}


def format_comparison(result: dict[str, Any]) -> str:
    method = result["method"]
    cells = text_table(["task", "anchor", "new", "old", "gap", "verdict"],
                       [[row["task"], row["anchor"], f"{row[method]:.1f}", f"{row[OLD]:.1f}", f"{row['gap_pp']:+.1f}",
                         row["verdict"]] for row in result["cells"]], left=2)
    anchors = text_table(["anchor", "tasks", "new mean", "old mean", "gap"],
                         [[row["anchor"], str(row["tasks"]), f"{row[method]:.2f}", f"{row[OLD]:.2f}",
                           f"{row['gap_pp']:+.2f}"] for row in result["anchors"]], left=1)
    rule = ("cannot be judged yet: " + "; ".join(result["incomplete"]) if result["incomplete"] else
            "passes: a higher mean at every anchor and no cell lost beyond the band" if result["passes"] else
            "does not pass: it needs a higher mean at every anchor and no cell lost beyond the band")
    return (f"{method}, new against old; tie band +/-{result['tie_band']['band_pp']:.2f}pp "
            f"({result['tie_band']['source']})\n\n{cells}\n\n{anchors}\n\nthe new setting {rule}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("new", type=Path, help="the sweep folder of the new setting")
    parser.add_argument("old", type=Path, help="the sweep folder of the current setting")
    parser.add_argument("--method", default="gfa", help="the method compared (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON instead of tables")
    args = parser.parse_args()
    result = compare(summary_of(args.new), summary_of(args.old), args.method)
    print(json.dumps(result, indent=1) if args.json else format_comparison(result))


if __name__ == "__main__":
    main()
