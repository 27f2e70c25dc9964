"""The `gfa` command line: one module per subcommand, each exposing `register(subparsers)` and `run(args)`.

Only the subcommand being run is imported (with its torch, transformers and PEFT), so `gfa --help`, a
subcommand's `--help` and usage errors answer at once, and a core install without the extras still runs
every subcommand that needs none of them.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import importlib.metadata
import re
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import NoReturn

from gfa_peft.io.files import OutputRefused

COMMANDS: dict[str, str] = {
    "count": "exact trainable counts of LoRA, DoRA, GFA, VeRA and VB-LoRA at matched budgets",
    "inspect": "realized rank, norm and energy share of every module's update in a saved GFA adapter",
    "merge": "merge a GFA adapter into its base checkpoint, one safetensors shard at a time",
    "convert": "a GFA adapter as a standard LoRA adapter (PEFT's convert_to_lora: SVD at a rank or energy)",
    "lens": "which class, GFA or LoRA, approximates a proxy update better at each budget (Prop. 3.2)",
    "bench": "paired step time and memory of GFA, LoRA and DoRA at matched rank anchors",
    "assets": "install and list the offline models and tasks",
    "train": "fine-tune and evaluate one run (GFA, LoRA, DoRA, VeRA, VB-LoRA or full) at a matched budget",
    "sweep": "train the grid tasks x methods x anchors x seeds; resumes; table, tie band, retention, figure",
    "tune": "pick each method's learning rate on the dev split (same grid, same number of trials per method)",
    "demo": "GFA vs LoRA vs DoRA on MiniLM / Rotten Tomatoes at 4 budgets (10 runs of the minilm recipe)",
}
"""Each subcommand (a module of this package) and its one-line summary."""



def experiments_extra() -> set[str]:
    """The import names of what `pip install 'gfa-peft[experiments]'` asks for beyond the core install."""
    requirements = importlib.metadata.requires("gfa-peft") or []
    extra = [re.split(r"[\s;<>=!~\[]", line, maxsplit=1)[0] for line in requirements if 'extra == "experiments"' in line]
    return {name.lower().replace("-", "_") for name in extra}


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit code 2, nothing written."""


class Parser(argparse.ArgumentParser):
    """An argparse parser with `--verbose` (on every subcommand, so it may come anywhere) and a did-you-mean for
    flags it does not know."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--verbose", action="store_true", default=argparse.SUPPRESS,  # absent: leaves an outer --verbose alone
            help="also show the load reports, warnings and log lines of transformers, PEFT and bitsandbytes "
            "(hidden by default)",
        )

    def parse_known_args(self, args=None, namespace=None):
        self._arguments = list(sys.argv[1:] if args is None else args)  # for `error`: what it was given
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        """argparse's error, except that a missing required flag that the user misspelled (`--modle`) names the
        misspelling and the flag it meant, as an unknown flag does."""
        if message.startswith("the following arguments are required"):
            unknown = [argument for argument in getattr(self, "_arguments", ())
                       if argument.startswith("--") and not self._knows(argument.split("=", 1)[0])]
            if unknown:
                self.reject_unknown(unknown)
        super().error(message)

    def _knows(self, flag: str) -> bool:
        """Whether `flag` is one of this parser's options or an abbreviation argparse accepts for one."""
        return any(option.startswith(flag) for action in self._actions for option in action.option_strings)

    def reject_unknown(self, unknown: Sequence[str]) -> NoReturn:
        """Exit with this parser's usage, naming each unknown argument and the flag it most likely meant."""
        options = [option for action in self._actions for option in action.option_strings]
        named = []
        for argument in unknown:
            close = difflib.get_close_matches(argument.split("=", 1)[0], options, n=1) if argument.startswith("-") else []
            named.append(f"{argument} (did you mean {close[0]}?)" if close else argument)
        self.error("unrecognized arguments: " + ", ".join(named))


def build_parser(command: str | None = None) -> Parser:
    """The `gfa` parser, with the full options of `command` only (the others are listed by name and summary)."""
    parser = Parser(prog="gfa", description="Global Factorized Adaptation: count, train, sweep, benchmark and analyse.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary in COMMANDS.items():
        if name == command:
            importlib.import_module(f"{__name__}.{name}").register(subparsers)
        else:
            subparsers.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((word for word in argv if not word.startswith("-")), None)
    try:
        parser = build_parser(command if command in COMMANDS else None)
        if command is not None and command not in COMMANDS:
            close = difflib.get_close_matches(command, COMMANDS, n=1)
            parser.error(f"unknown command {command!r}" + (f" (did you mean {close[0]}?)" if close else "")
                         + f"; commands: {', '.join(COMMANDS)}")
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            _innermost_parser(parser, argv).reject_unknown(unknown)
        with quiet_libraries(enabled=not getattr(args, "verbose", False)):
            return args.run(args) or 0
    except (UsageError, OutputRefused) as error:  # OutputRefused: io/files.py's rule kept the user's files
        print(f"gfa {command}: error: {error}" if command in COMMANDS else f"gfa: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] not in experiments_extra():
            raise
        print(f"gfa {command} needs the experiments extra ({error.name} is missing): "
              "pip install 'gfa-peft[experiments]'", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`gfa ... | head`): not an error of ours
        sys.stderr.close()
        return 0


def _innermost_parser(parser: Parser, argv: Sequence[str]) -> Parser:
    """The parser of the deepest subcommand `argv` names (`gfa assets install ...`: install's)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = next((action.choices[word] for word in argv if word in action.choices), None)
            if chosen is not None:
                return _innermost_parser(chosen, argv)
    return parser


QUIET_LOGGERS = ("transformers", "peft", "bitsandbytes", "datasets")
"""Libraries whose info and warning lines a command run hides unless --verbose: transformers' LOAD REPORT (a
classification head is new by design), bitsandbytes' note that it could not fetch an optional CPU kernel from
the Hub (nothing here downloads), dataset progress notes."""
HARMLESS_WARNINGS = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),  # transformers 5 asked by PEFT; no action of ours
)


@contextlib.contextmanager
def quiet_libraries(enabled: bool = True) -> Iterator[None]:
    """While a command runs, show only errors from the third-party libraries and hide the known-harmless
    warnings; afterwards everything is as it was (a library user's own logging setup is never changed)."""
    if not enabled:
        yield
        return
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    verbosity = os.environ.get("TRANSFORMERS_VERBOSITY")
    # transformers sets its level from this variable when it is first imported (here, or in a bench worker).
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            for category, message in HARMLESS_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if verbosity is None:
            os.environ.pop("TRANSFORMERS_VERBOSITY", None)
        else:
            os.environ["TRANSFORMERS_VERBOSITY"] = verbosity


if __name__ == "__main__":
    sys.exit(main())
