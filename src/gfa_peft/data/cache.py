"""The local cache that `gfa assets install` fills: one folder per converted asset.

A folder counts as complete only when it holds `DONE.json`, its record. Assets are built in a
temporary sibling folder, the record is written last, and only then is the folder renamed into
place, so an interrupted install never leaves something that looks complete: the next install
finds the leftovers, removes them and builds again.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gfa_peft.io.files import ResultKind, leftovers, output_folder, write_json_atomic

DONE = "DONE.json"


class MissingAssetError(RuntimeError):
    """A model or task that `gfa assets install` has not (completely) converted yet."""


def cache_dir() -> Path:
    """The cache root: `$GFA_CACHE`, else the platform's user cache folder + `gfa-peft`."""
    configured = os.environ.get("GFA_CACHE")
    if configured:
        return Path(configured).expanduser()
    return _user_cache_root() / "gfa-peft"


def asset_folder(kind: str, name: str, cache: Path | None = None) -> Path:
    """Where asset `name` of kind "model" or "task" lives: `<cache>/models/<name>` or `<cache>/tasks/<name>`."""
    return (Path(cache) if cache is not None else cache_dir()) / f"{kind}s" / name


def _user_cache_root() -> Path:
    home = Path.home()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    if sys.platform == "darwin":
        return home / "Library" / "Caches"
    return Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache")


def read_record(folder: Path) -> dict[str, Any] | None:
    """The record of a complete asset folder; None when the folder is absent or incomplete."""
    try:
        return json.loads((folder / DONE).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def has_leftovers(folder: Path) -> bool:
    """Whether an incomplete `folder` or the temporary folder of an interrupted build exists."""
    return (folder.exists() and read_record(folder) is None) or bool(leftovers(folder))


ASSET = ResultKind("asset", is_own=lambda folder: True, is_finished=lambda folder: read_record(folder) is not None)
"""Everything in the cache's asset folders is the cache's own: an asset build may replace any of it."""


def build_folder(folder: Path, build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Build an asset into `folder` so that it appears complete or not at all (`io.files.output_folder`).

    `build(scratch)` writes the asset's files into an empty scratch folder and returns the record;
    the record becomes `DONE.json`, written last, and the scratch folder is then renamed to `folder`,
    replacing an incomplete one. The leftovers of interrupted builds are removed first. A cache that cannot
    be written (permissions, a full disk) raises OutputRefused naming it.
    """
    with output_folder(folder, ASSET, overwrite=True) as scratch:
        record = build(scratch)
        write_json_atomic(scratch / DONE, record)
    return record


def folder_megabytes(folder: Path) -> float:
    """Disk size of every file under `folder`, in MB (10^6 bytes)."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 1e6
