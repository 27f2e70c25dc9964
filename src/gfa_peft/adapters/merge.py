"""Merge a GFA adapter into a safetensors checkpoint one shard at a time, never loading the model.

Each adapted module's weight becomes W + s * slice(B A), its slice formed by itself from the
factors (`slice_of_product`) and added in float32, or in float64 to a float64 weight
(`weight_plus_update`); every other tensor is copied unchanged, shard by shard, so memory holds
one shard plus one module's update. Which way a weight is stored is
read from the base model's own classes, built on the meta device from its config.json: GFA lays
updates out as (out, in, ...), and transformers' GPT-2 `Conv1D` stores (in, out), which a shape
test cannot tell apart for square weights. `modules_to_save` tensors saved with the adapter
(e.g. a classifier head) replace the base's.

The architecture is the one the adapter was trained on (`adapters.task_model`): a classifier adapter
trained on a bare encoder checkpoint (`gfa train` wraps MiniLM's `BertModel` in
`AutoModelForSequenceClassification`) is merged into that classifier: its saved head is added to the last
shard, every tensor is written under the classifier's own name (`bert.encoder...`), and the config names
the classifier's class and label count, so plain transformers loads the output as the trained model.

Everything is checked from file headers before anything is written: shard names must be plain file
names inside the base folder, and two adapted modules may not share one weight. The output folder is
written by io/files.py's rule: built under a temporary name and renamed into place when complete, never
over a folder that is not a checkpoint or that holds the adapter or the base.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PretrainedConfig

from gfa_peft.adapters.saved import SavedAdapter, load_saved_adapter
from gfa_peft.adapters.task_model import head_label_count
from gfa_peft.data.cache import DONE
from gfa_peft.data.presets import architecture_config, load_architecture
from gfa_peft.io.files import ResultKind, output_folder
from gfa_peft.scatter import SliceSpec, slice_of_product, weight_plus_update
from gfa_peft.targets import check_untied
from gfa_peft.tuner.checkpoint import read_safetensors_header
from gfa_peft.weight_ops import WeightOp, op_for, update_shape
from gfa_peft.tuner.task_classes import TASK_MODEL_CLASSES

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Weights in other formats are never copied: they would hold the unmerged base next to the merged one.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf", ".index.json")
SAVED_MODULE_PREFIX = "base_model.model."


def is_checkpoint(folder: Path) -> bool:
    """Whether `folder` is a model checkpoint (config and safetensors weights, no subfolders), as merge writes."""
    entries = list(folder.iterdir())
    names = {entry.name for entry in entries}
    return (CONFIG_FILE in names and bool(names & {SINGLE_FILE, INDEX_FILE})
            and not any(entry.is_dir() for entry in entries))


MERGED = ResultKind("merged model", is_own=is_checkpoint, is_finished=is_checkpoint, manifest="gfa_merge.json")
"""A merged model lists its files in gfa_merge.json: `--overwrite` replaces a folder holding nothing else."""


@dataclass(frozen=True)
class Addition:
    """One adapted weight: where its update sits in the grid, and how its layer stores it."""

    spec: SliceSpec
    op: WeightOp


@dataclass(frozen=True)
class MergePlan:
    """Everything `write_merged` needs, checked against the checkpoint's headers."""

    adapter: Path
    base: Path
    shards: tuple[str, ...]
    index: str | None
    B: torch.Tensor
    A: torch.Tensor
    additions: dict[str, Addition]  # checkpoint key -> its update
    replacements: dict[str, torch.Tensor]  # checkpoint key -> tensor saved with the adapter
    added: dict[str, torch.Tensor]  # output key -> tensor saved with the adapter that the checkpoint lacks
    renamed: dict[str, str]  # checkpoint key -> its output key, where they differ
    architecture: str
    config: PretrainedConfig | None  # written as config.json when the architecture is not the base's own
    copied: tuple[str, ...]
    skipped: tuple[str, ...]
    n_tensors: int


def plan_merge(adapter_dir: str | os.PathLike, base_dir: str | os.PathLike) -> MergePlan:
    """Read and check an adapter and a base checkpoint; raise ValueError naming the first problem."""
    base = Path(base_dir)
    adapter = load_saved_adapter(adapter_dir)
    layout = adapter.layout
    shards, index = checkpoint_shards(base)
    headers = {key: entry for shard in shards for key, entry in read_safetensors_header(base / shard).items()}
    task_model = task_architecture(base, adapter)
    own_architecture = task_model is None
    model = load_architecture(base) if own_architecture else task_model
    modules = dict(model.named_modules())
    check_untied([(piece.name, modules[piece.name]) for piece in layout.modules if piece.name in modules])

    additions = {}
    for piece in layout.modules:
        module = modules.get(piece.name)
        if module is None:
            raise ValueError(
                f"adapter module {piece.name!r} is not a module of the base model ({type(model).__name__} in {base})"
            )
        shape = update_shape(module, piece.name)
        if shape != piece.shape:
            raise ValueError(
                f"module {piece.name!r} has update shape {list(piece.shape)} in the adapter but "
                f"{list(shape)} in the base model"
            )
        key = checkpoint_key(f"{piece.name}.weight", headers, model)
        _check_shape(key, headers[key]["shape"], module.weight.shape)
        additions[key] = Addition(adapter.spec(piece), op_for(module, piece.name))

    replacements, added = _place_saved_tensors(adapter.others, headers, model, may_add=not own_architecture)
    renamed = {} if own_architecture else _output_names(model, headers, added)

    copied, skipped = [], []
    for entry in sorted(os.listdir(base)):
        if (base / entry).is_file() and entry not in shards and entry not in (index, DONE, MERGED.manifest):
            if entry == CONFIG_FILE and not own_architecture:
                continue  # written from the model's own config instead
            (skipped if entry.endswith(WEIGHT_SUFFIXES) else copied).append(entry)
    return MergePlan(
        adapter=Path(adapter_dir), base=base, shards=shards, index=index, B=adapter.B, A=adapter.A, additions=additions,
        replacements=replacements, added=added, renamed=renamed, architecture=type(model).__name__,
        config=None if own_architecture else model.config, copied=tuple(copied), skipped=tuple(skipped),
        n_tensors=len(headers) + len(added),
    )


def task_architecture(base: Path, adapter: SavedAdapter) -> nn.Module | None:
    """The model the adapter was trained on, on the meta device, where it is not the base's own architecture:
    its task type's class built from the base's config (a classifier's with its saved head's label count).
    None for an adapter without a task type, or when that class is the base's own."""
    task_class = TASK_MODEL_CLASSES.get(adapter.config.task_type)
    if task_class is None:
        return None
    config = architecture_config(base)
    own_classes = config.architectures or []
    labels = head_label_count(adapter.config, adapter.others)
    if labels is not None:
        config.num_labels = labels
    with torch.device("meta"):
        model = task_class.from_config(config)
    if type(model).__name__ in own_classes:
        return None
    model.config.architectures = [type(model).__name__]
    return model


def _place_saved_tensors(saved: dict[str, torch.Tensor], headers: dict, model: nn.Module,
                         may_add: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Where the adapter's saved tensors (a classifier head) go: {checkpoint key: tensor} for those replacing a
    tensor of the checkpoint and, when `may_add`, {parameter name: tensor} for those the checkpoint lacks."""
    parameters = dict(model.named_parameters())
    replacements, added = {}, {}
    for saved_key, tensor in saved.items():
        name = saved_key.removeprefix(SAVED_MODULE_PREFIX)
        if may_add and not any(key in headers for key in _candidate_keys(name, model)):
            if name not in parameters or parameters[name].shape != tensor.shape:
                raise ValueError(f"the adapter's saved {name!r} ({list(tensor.shape)}) is neither in the base "
                                 f"checkpoint nor a parameter of that shape of {type(model).__name__}")
            added[name] = tensor
        else:
            key = checkpoint_key(name, headers, model)
            _check_shape(key, headers[key]["shape"], tensor.shape)
            replacements[key] = tensor
    return replacements, added


def _output_names(model: nn.Module, headers: dict, added: dict[str, torch.Tensor]) -> dict[str, str]:
    """The checkpoint keys that lack the model's base prefix (a bare encoder's `encoder...` for a classifier's
    `bert.encoder...`), each with the name the model gives that tensor. Raises ValueError when a parameter of
    the model would be in neither the output nor the adapter: it was initialised at random when the adapter was
    trained, so no checkpoint reproduces that model."""
    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""
    names = set(model.state_dict())
    renamed = {key: prefix + key for key in headers if key not in names and prefix + key in names}
    written = {renamed.get(key, key) for key in headers} | set(added)
    unsaved = [name for name, _ in model.named_parameters() if name not in written]
    if unsaved:
        raise ValueError(f"{type(model).__name__} has parameters that neither the base checkpoint nor the adapter "
                         f"holds: {unsaved[:5]}")
    return renamed


def checkpoint_shards(base: Path) -> tuple[tuple[str, ...], str | None]:
    """The safetensors files of a checkpoint folder, in order, and its index file (None for a single file)."""
    if not (base / CONFIG_FILE).is_file():
        raise ValueError(f"base model folder {base} has no {CONFIG_FILE}")
    if (base / INDEX_FILE).is_file():
        shards = tuple(sorted(set(_weight_map(base / INDEX_FILE).values())))
        outside = [shard for shard in shards if not _plain_file_name(shard)]
        if outside:  # the names become paths in the output folder too: they must not lead out of it
            raise ValueError(f"{base / INDEX_FILE} names shard {outside[0]!r}, which is not a file name inside "
                             f"{base}; refusing to merge")
        missing = [shard for shard in shards if not (base / shard).is_file()]
        if missing:
            raise ValueError(f"{base / INDEX_FILE} lists shards that are missing: {missing}")
        return shards, INDEX_FILE
    if (base / SINGLE_FILE).is_file():
        return (SINGLE_FILE,), None
    others = [name for name in ("pytorch_model.bin", "pytorch_model.bin.index.json") if (base / name).is_file()]
    hint = f"; it has {others[0]}: only safetensors checkpoints are merged" if others else ""
    raise ValueError(f"base model folder {base} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")


def _weight_map(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a checkpoint index: {type(error).__name__} {error}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        raise ValueError(f"{path} is not a checkpoint index: its weight_map is not a map of tensor to file name")
    return weight_map


def _plain_file_name(name: str) -> bool:
    """A name that stays in the folder it is joined to: no folder part, not absolute, not '.' or '..'."""
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name


def checkpoint_key(name: str, headers: dict, model: nn.Module) -> str:
    """The checkpoint's key for a parameter of `model`, which may lack the model's base prefix
    (a checkpoint of the bare `GPT2Model` says `h.0...` where `GPT2LMHeadModel` says `transformer.h.0...`)."""
    for key in _candidate_keys(name, model):
        if key in headers:
            return key
    raise ValueError(f"the base checkpoint holds no tensor {name!r} (is it a checkpoint of this architecture?)")


def _candidate_keys(name: str, model: nn.Module) -> tuple[str, str]:
    """A parameter's name, and the same without the model's base prefix."""
    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""
    return name, name.removeprefix(prefix)


def _check_shape(key: str, stored: list[int], expected) -> None:
    if list(stored) != list(expected):
        raise ValueError(
            f"tensor {key!r} has shape {list(stored)} in the base checkpoint, the adapter needs {list(expected)}"
        )


def write_merged(plan: MergePlan, out_dir: str | os.PathLike, overwrite: bool = False, progress: bool = True) -> dict:
    """Write the merged checkpoint to `out_dir` (`io.files.output_folder`: built under a temporary name, then
    renamed into place) and return a summary. `overwrite` replaces a checkpoint there once the new one is
    complete; a folder of other files, or one holding the adapter or the base, raises OutputRefused."""
    out = Path(out_dir)
    with output_folder(out, MERGED, overwrite, inputs=(plan.adapter, plan.base)) as building:
        with tqdm(total=plan.n_tensors, unit="tensor", desc="merging", disable=not progress) as bar:
            for shard in plan.shards:
                added = plan.added if shard == plan.shards[-1] else {}
                merge_shard(plan, shard, building / shard, added, bar)
        if plan.index is not None:
            write_index(plan, building / plan.index)
        if plan.config is not None:
            plan.config.to_json_file(building / CONFIG_FILE)
        for name in plan.copied:
            shutil.copy2(plan.base / name, building / name)
    return {
        "base": str(plan.base),
        "out": str(out),
        "architecture": plan.architecture,
        "shards": len(plan.shards),
        "tensors": plan.n_tensors,
        "merged_modules": len(plan.additions),
        "replaced_tensors": sorted(plan.replacements),
        "added_tensors": sorted(plan.added),
        "copied_files": list(plan.copied),
        "skipped_weight_files": list(plan.skipped),
    }


def merge_shard(plan: MergePlan, shard: str, destination: Path, added: dict[str, torch.Tensor], bar: tqdm) -> None:
    """Copy one shard with the adapter's updates added, its saved tensors substituted, the keys renamed as the
    plan says, and the `added` tensors appended."""
    tensors = {}
    with safe_open(plan.base / shard, framework="pt") as source:
        metadata = source.metadata() or {"format": "pt"}
        for key in source.keys():
            tensor = source.get_tensor(key)
            if key in plan.additions:
                addition = plan.additions[key]
                update = addition.op.stored(slice_of_product(plan.B, plan.A, addition.spec))
                tensor = weight_plus_update(tensor, update)
            elif key in plan.replacements:
                tensor = plan.replacements[key].to(tensor.dtype).contiguous()
            tensors[plan.renamed.get(key, key)] = tensor
            bar.update()
    for key, tensor in added.items():
        tensors[key] = tensor.contiguous()
        bar.update()
    save_file(tensors, destination, metadata=metadata)


def write_index(plan: MergePlan, destination: Path) -> None:
    """The base's checkpoint index with the plan's renamed keys, and its added tensors in the last shard."""
    index = json.loads((plan.base / plan.index).read_text(encoding="utf-8"))
    weight_map = {plan.renamed.get(key, key): shard for key, shard in index["weight_map"].items()}
    weight_map.update({key: plan.shards[-1] for key in plan.added})
    index["weight_map"] = weight_map
    metadata = index.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("total_size"), int):
        metadata["total_size"] += sum(tensor.numel() * tensor.element_size() for tensor in plan.added.values())
    destination.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
