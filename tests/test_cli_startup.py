"""The `gfa` command answers at once: help and usage errors never load torch, and speak one dialect."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gfa_peft.cli import COMMANDS, build_parser, main

SOURCE = str(Path(__file__).resolve().parents[1] / "src")

# Runs the command line in a fresh interpreter, then reports which heavy libraries the run imported.
PROBE = """
import sys
from gfa_peft.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("HEAVY:", ",".join(sorted(name for name in ("torch", "transformers", "peft", "datasets", "matplotlib")
                             if name in sys.modules)))
"""


def heavy_imports(*arguments: str) -> tuple[list[str], str]:
    """The heavy libraries `gfa ARGUMENTS` imported, and what it wrote to stderr."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([SOURCE, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", PROBE, *arguments], capture_output=True, text=True,
                          env=environment, timeout=120, check=True)
    heavy = done.stdout.rsplit("HEAVY:", 1)[1].strip()
    return [name for name in heavy.split(",") if name], done.stderr


@pytest.mark.parametrize("arguments", [["--help"], *([name, "--help"] for name in COMMANDS)], ids=" ".join)
def test_help_imports_no_heavy_library(arguments):
    assert heavy_imports(*arguments)[0] == []


@pytest.mark.parametrize("command", COMMANDS)
def test_help_texts_hold_no_unformatted_placeholder(command, capsys):
    """A help string that lost its f prefix prints its code ("{', '.join(...)}") instead of the names."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "{'" not in text and ".join(" not in text, text


@pytest.mark.parametrize("arguments", [["inspect"], ["bench", "--dtype", "float16"], ["count", "--model", "nope"],
                                       ["tune", "--lrs", "0.01", "--eval-split", "dev"]], ids=" ".join)
def test_usage_errors_import_no_heavy_library(arguments):
    heavy, error = heavy_imports(*arguments)
    assert heavy == [] and "error:" in error


def test_a_usage_error_imports_no_heavy_library_and_suggests_the_flag():
    heavy, error = heavy_imports("train", "--task", "rt", "--output", "runs/x")
    assert heavy == []
    assert "usage: gfa train" in error
    assert "unrecognized arguments: --output (did you mean --out?)" in error


def test_a_mistyped_flag_gets_the_subcommands_usage_and_a_suggestion(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["assets", "list", "--jsn", "-"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "usage: gfa assets list" in error and "--jsn (did you mean --json?)" in error


def test_a_mistyped_command_gets_a_suggestion(capsys):
    with pytest.raises(SystemExit):
        main(["trian", "--task", "rt"])
    assert "unknown command 'trian' (did you mean train?)" in capsys.readouterr().err


def _actions(parser):
    """Every option of `parser` and of the subcommands below it (`gfa assets install`, `gfa assets list`)."""
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _actions(child)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_json_flag_takes_a_file_or_dash_and_every_option_shows_its_value_and_default(command):
    for action in _actions(_subcommand_parser(command)):
        if "--json" in action.option_strings:
            assert action.metavar == "FILE" and "'-': to standard output" in action.help
        if action.option_strings and action.nargs != 0 and action.choices is None:
            assert action.metavar, action.option_strings  # chosen to describe the value, not argparse's TRAIN_FILE
        if action.default not in (None, False, argparse.SUPPRESS):
            assert "default" in action.help, action.option_strings


def _subcommand_parser(command: str) -> argparse.ArgumentParser:
    (subcommands,) = [action for action in build_parser(command)._actions
                      if isinstance(action, argparse._SubParsersAction)]
    return subcommands.choices[command]


def test_a_misspelled_required_flag_gets_a_suggestion_not_a_missing_flag(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["count", "--modle", "minilm"])
    assert stopped.value.code == 2
    assert "unrecognized arguments: --modle (did you mean --model?)" in capsys.readouterr().err


@pytest.mark.parametrize("arguments", [["train", "--task", "nope"], ["train", "--task", "arc_easy+nope"],
                                       ["sweep", "--tasks", "rt,nope"]], ids=" ".join)
def test_an_unknown_task_is_refused_before_torch_loads(arguments):
    heavy, error = heavy_imports(*arguments)
    assert heavy == [] and "unknown task 'nope'; known tasks: rt," in error
