"""The flags several `gfa` subcommands share and their parsers; each parser raises `UsageError` naming the flag.

Nothing here imports torch: subcommands build their help from it.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gfa_peft import __version__
from gfa_peft.cli import UsageError
from gfa_peft.io.files import REPORT_MARK, write_json_atomic
from gfa_peft.defaults import ALL_LINEAR


def parse_list(text: str, flag: str) -> list[str]:
    """A comma-separated list with no empty entries."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise UsageError(f"{flag} {text!r} has an empty entry")
    return items


def comma_list(flag: str) -> Callable[[str], list[str]]:
    """`parse_list` for `flag`, as an argparse type."""
    return functools.partial(parse_list, flag=flag)


def parse_targets(text: str) -> str | list[str]:
    """`--targets`: a comma list of module names, or all-linear."""
    return ALL_LINEAR if text.strip().lower() == ALL_LINEAR else parse_list(text, "--targets")


def output_path(argument: str | None) -> Path | None:
    """Where an optional output file goes (None: standard output), checked before anything runs."""
    if argument is None or argument == "-":
        return None
    path = Path(argument)
    if not path.parent.is_dir():
        raise UsageError(f"cannot write {argument!r}: folder {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise UsageError(f"cannot write {argument!r}: it is a folder")
    return path


def json_report_path(argument: str | None, overwrite: bool | None = None) -> Path | None:
    """`output_path` for `--json`: an existing file is replaced only when it is a report of ours (or with the
    command's `--overwrite`; None: it has none), so a mistyped `--json` never replaces a user's file (a model's
    config.json, say)."""
    return own_output_path(argument, is_report, "a gfa JSON report", overwrite)


def plot_output_path(argument: str | None) -> Path | None:
    """`output_path` for `--plot`: an existing file is replaced only when it is a figure of ours (`is_plot`)."""
    return own_output_path(argument, is_plot, "a gfa figure")


def own_output_path(argument: str | None, is_ours: Callable[[Path], bool], what: str,
                    overwrite: bool | None = None) -> Path | None:
    """`output_path` for a file a command writes beside its work: an existing file is replaced only when
    `is_ours` says it holds `what` (or with the command's `--overwrite`; None: it has none)."""
    path = output_path(argument)
    if path is not None and path.exists() and not overwrite and not is_ours(path):
        raise UsageError(f"cannot write {argument!r}: it exists and is not {what}, so it is left alone; "
                         "choose another file" + (" or pass --overwrite" if overwrite is not None else ""))
    return path


def is_report(path: Path) -> bool:
    """Whether `path` holds a report `emit_json` wrote: an object with `REPORT_MARK`, or `gfa bench`'s list of
    records (each with its method and anchor)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if isinstance(data, list):
        return bool(data) and all(isinstance(item, dict) and {"method", "anchor"} <= set(item) for item in data)
    return isinstance(data, dict) and REPORT_MARK in data


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_plot(path: Path) -> bool:
    """Whether `path` is a PNG that `save_figure` wrote: one whose text chunks hold `REPORT_MARK`."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if not data.startswith(PNG_SIGNATURE):
        return False
    position = len(PNG_SIGNATURE)
    while position + 8 <= len(data):  # chunks: length (4 bytes, big-endian), type (4), data, CRC (4)
        length, kind = int.from_bytes(data[position:position + 4], "big"), data[position + 4:position + 8]
        body = data[position + 8:position + 8 + length]
        if kind in (b"tEXt", b"iTXt", b"zTXt") and body.split(b"\0", 1)[0] == REPORT_MARK.encode():  # keyword first
            return True
        if kind == b"IEND":
            return False
        position += 12 + length
    return False


def add_json_argument(parser: argparse.ArgumentParser, what: str, replaces: str = "the readable report") -> None:
    """`--json FILE`, the same in every subcommand: `what` as JSON to FILE, or to standard output with '-'
    (which then holds only the JSON, instead of `replaces`)."""
    parser.add_argument("--json", metavar="FILE",
                        help=f"write {what} as JSON to FILE; '-': to standard output, instead of {replaces}")


def emit_json(report: Mapping[str, Any], json_argument: str | None, path: Path | None) -> bool:
    """Write `report` where `--json` asks: to standard output ('-') or to the file `path` (atomically).
    Returns whether the readable report should be printed too (not when the JSON took standard output).
    A report that is a JSON object gets `REPORT_MARK` first."""
    if isinstance(report, Mapping):
        report = {REPORT_MARK: f"gfa-peft {__version__}", **report}
    if json_argument == "-":
        json.dump(report, sys.stdout, indent=2)
        print()
        return False
    if path is not None:
        write_json_atomic(path, report)
    return True
