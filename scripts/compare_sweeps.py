"""One method's cells in two sweep folders, side by side: the shipping rule of docs/study.md.

A new setting of a method (GFA under s = 1/sqrt(r)) and its current one (GFA at s = 1) cannot share a sweep folder
(one method under two settings would mix in one summary), so each has its own. This script reads both folders'
`results.json` and, for every (task, anchor) both ran, puts the new mean beside the old, with the verdict within
the tie band (2 x the seed std pooled over every cell of both folders, as `gfa sweep` pools its own); then the
mean over the tasks at each anchor, and whether the new setting passes the rule: a higher mean at every anchor,
and no cell lost beyond the band.

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


def cells_of(folder: Path) -> list[dict[str, Any]]:
    """The cells of a finished sweep's summary."""
    path = folder / "results.json"
    if not path.is_file():
        raise SystemExit(f"{folder} holds no results.json: not a finished `gfa sweep` folder")
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def compare(new: list[dict[str, Any]], old: list[dict[str, Any]], method: str) -> dict[str, Any]:
    """Every (task, anchor) cell of `method` in both, the means over tasks per anchor, and the rule's outcome."""
    band = tie_band([*new, *old])
    renamed = [{**cell, "method": OLD} for cell in old if cell["method"] == method and cell["module_order"] is None]
    rows = verdicts([*new, *renamed], band["band_pp"], method=method, rival=OLD)
    anchors = []
    for anchor in dict.fromkeys(row["anchor"] for row in rows):
        here = [row for row in rows if row["anchor"] == anchor]
        new_mean, old_mean = (statistics.fmean(row[side] for row in here) for side in (method, OLD))
        anchors.append({"anchor": anchor, "tasks": len(here), method: new_mean, OLD: old_mean,
                        "gap_pp": new_mean - old_mean})
    passes = bool(rows) and all(row["gap_pp"] > 0 for row in anchors) and not any(
        row["verdict"] == "loss" for row in rows)
    return {"method": method, "tie_band": band, "cells": rows, "anchors": anchors, "passes": passes}


def format_comparison(result: dict[str, Any]) -> str:
    method = result["method"]
    cells = text_table(["task", "anchor", "new", "old", "gap", "verdict"],
                       [[row["task"], row["anchor"], f"{row[method]:.1f}", f"{row[OLD]:.1f}", f"{row['gap_pp']:+.1f}",
                         row["verdict"]] for row in result["cells"]], left=2)
    anchors = text_table(["anchor", "tasks", "new mean", "old mean", "gap"],
                         [[row["anchor"], str(row["tasks"]), f"{row[method]:.2f}", f"{row[OLD]:.2f}",
                           f"{row['gap_pp']:+.2f}"] for row in result["anchors"]], left=1)
    rule = ("passes: a higher mean at every anchor and no cell lost beyond the band" if result["passes"] else
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
    result = compare(cells_of(args.new), cells_of(args.old), args.method)
    print(json.dumps(result, indent=1) if args.json else format_comparison(result))


if __name__ == "__main__":
    main()
