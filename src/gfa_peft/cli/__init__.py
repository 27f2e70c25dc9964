"""The `gfa` command line: one module per subcommand, each exposing `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Each name is a module of this package whose `register` adds one subcommand.
COMMANDS: list[str] = ["count", "assets", "lens", "bench", "merge", "train", "sweep", "demo", "tune", "inspect"]


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit code 2, nothing written."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gfa", description="Global Factorized Adaptation: count, train, sweep, benchmark and analyse."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as error:  # raised by a flag's parser (cli/arguments.py)
        print(f"gfa: error: {error}", file=sys.stderr)
        return 2
    try:
        return args.run(args) or 0
    except UsageError as error:
        print(f"gfa {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`gfa ... | head`): not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
