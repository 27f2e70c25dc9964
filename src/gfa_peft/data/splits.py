"""Deduplication and fixed train/dev/test splits.

A split depends only on each example's `id` and the seed: examples are ordered by
sha256("<seed>:<id>") and cut at the cumulative fractions. No random generator is involved, so a
split is the same on every machine and library version, whatever order the rows arrive in.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

SEED = 0
Row = dict[str, Any]


def normalise(text: str) -> str:
    """Lowercase letters and digits only, accents dropped: the key under which two texts are duplicates."""
    return re.sub(r"[\W_]+", "", unicodedata.normalize("NFKD", text).lower())


def deduplicate(rows: Iterable[Row], text_column: str = "text") -> list[Row]:
    """Keep the first row of each normalised text; drop every text whose copies disagree on the label."""
    first: dict[str, Row] = {}
    labels: dict[str, set[Any]] = {}
    for row in rows:
        key = normalise(row[text_column])
        first.setdefault(key, row)
        labels.setdefault(key, set()).add(row["label"])
    return [row for key, row in first.items() if len(labels[key]) == 1]


def carve(rows: Iterable[Row], fractions: Mapping[str, float], seed: int = SEED) -> dict[str, list[Row]]:
    """Split rows into the named parts with the given fractions (summing to 1), by the hash of their ids.

    Part sizes are the differences of round(n * cumulative fraction), so they add up to n exactly.
    """
    if not math.isclose(sum(fractions.values()), 1.0):
        raise ValueError(f"split fractions must sum to 1, got {dict(fractions)}")
    ordered = sorted(rows, key=lambda row: hashlib.sha256(f"{seed}:{row['id']}".encode()).hexdigest())
    bounds = [round(len(ordered) * cumulative) for cumulative in itertools.accumulate(fractions.values())]
    bounds[-1] = len(ordered)  # the last part takes the rest, whatever the float rounding
    return {name: ordered[start:end] for name, start, end in zip(fractions, [0, *bounds], bounds)}
