"""Parsers for the flags several `gfa` subcommands share; each raises `UsageError` naming the flag."""

from __future__ import annotations

from pathlib import Path

from gfa_peft.cli import UsageError
from gfa_peft.layout import ModuleOrder
from gfa_peft.targets import ALL_LINEAR


def parse_list(text: str, flag: str) -> list[str]:
    """A comma-separated list with no empty entries."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise UsageError(f"{flag} {text!r} has an empty entry")
    return items


def parse_targets(text: str) -> str | list[str]:
    """`--targets`: a comma list of module names, or all-linear."""
    return ALL_LINEAR if text.strip().lower() == ALL_LINEAR else parse_list(text, "--targets")


def parse_module_order(text: str) -> ModuleOrder:
    """`--module-order`: model, by_name, or an integer seed."""
    try:
        return int(text)
    except ValueError:
        return text


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
