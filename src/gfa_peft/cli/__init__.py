"""The `gfa` command line: one module per subcommand, each exposing `register(subparsers)` and `run(args)`.

Only the subcommand being run is imported (with its torch, transformers and PEFT), so `gfa --help`, a
subcommand's `--help` and usage errors answer at once, and a core install without the extras still runs
every subcommand that needs none of them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import re
import sys
from collections.abc import Sequence

from gfa_peft.io.files import OutputRefused

COMMANDS: dict[str, str] = {
    "count": "exact trainable counts of LoRA, DoRA, GFA, VeRA and VB-LoRA at matched budgets",
    "inspect": "realized rank, norm and energy share of every module's update in a saved GFA adapter",
    "merge": "merge a GFA adapter into its base checkpoint, one safetensors shard at a time",
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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `gfa` parser, with the full options of `command` only (the others are listed by name and summary)."""
    parser = argparse.ArgumentParser(
        prog="gfa", description="Global Factorized Adaptation: count, train, sweep, benchmark and analyse."
    )
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
        args = build_parser(command if command in COMMANDS else None).parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
