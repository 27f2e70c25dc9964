"""Where the lens's proxy target update Delta* comes from: two model folders, an adapter on its base, or a file.

Every source yields {module name: update} in the model's own module order, each update float32 in GFA's
(out, in, ...) orientation (transformers' `Conv1D` weights are seen transposed, as `gfa_peft.weight_ops` does),
so `gfa_peft.analysis.lens` lays it out exactly as the method would. Module names and target matching are
`gfa_peft.targets`', i.e. PEFT's `target_modules` semantics. Bad input raises ValueError naming the problem.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from peft.utils import load_peft_weights
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import AutoConfig, PretrainedConfig

from gfa_peft.adapters.task_model import head_label_count
from gfa_peft.io.files import write_atomic
from gfa_peft.data.presets import load_architecture
from gfa_peft.targets import ALL_LINEAR, default_targets, find_targets, target_shapes
from gfa_peft.tuner.checkpoint import read_safetensors_header
from gfa_peft.weight_ops import op_for
from gfa_peft.tuner.task_classes import TASK_MODEL_CLASSES

Targets = str | Sequence[str]

MODULE_ORDER_KEY = "gfa_lens_modules"
"""Safetensors metadata entry holding the module order (a JSON list), since safetensors sorts its keys."""


def deltas_from_models(
    base_dir: str | os.PathLike, tuned_dir: str | os.PathLike, targets: Targets | None = None
) -> dict[str, Tensor]:
    """Delta W_i* = W_i(tuned) - W_i(base) on the target modules (default: PEFT's LoRA default for the type).

    Both folders are read with the tuned model's class (a classifier fine-tuned from a bare encoder keeps the
    encoder's module names), after checking on the meta device that they have the same model type and the same
    target modules with the same shapes.
    """
    base_config, tuned_config = _config(base_dir, "base"), _config(tuned_dir, "tuned")
    if base_config.model_type != tuned_config.model_type:
        raise ValueError(
            f"base {str(base_dir)!r} is a {base_config.model_type!r} model but tuned {str(tuned_dir)!r} "
            f"is a {tuned_config.model_type!r} model"
        )
    tuned_meta = load_architecture(tuned_dir)
    model_class = type(tuned_meta)
    with torch.device("meta"):
        base_meta = model_class(base_config)
    targets = default_targets(tuned_meta) if targets is None else targets
    _check_same_targets(target_shapes(base_meta, targets), target_shapes(tuned_meta, targets), base_dir, tuned_dir)
    base = _target_weights(model_class, base_dir, targets)
    tuned = _target_weights(model_class, tuned_dir, targets)
    return {name: tuned[name] - base[name] for name in tuned}


def deltas_from_adapter(
    adapter_dir: str | os.PathLike, base_dir: str | os.PathLike, targets: Targets | None = None
) -> dict[str, Tensor]:
    """Delta W_i* of any adapter PEFT can load: merged weights minus base weights on the target modules
    (default: the adapter's own `target_modules`).

    The base is loaded in float32 with the class of the adapter's task type (or the base's own class without
    one), so the difference is exactly the merged update. A classification adapter carries its trained head, and
    the base is given that head's number of labels so the head loads; the head is not a target.
    """
    adapter_dir = _folder(adapter_dir, "adapter")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ValueError(f"adapter folder {str(adapter_dir)!r} has no adapter_config.json")
    config = PeftConfig.from_pretrained(adapter_dir)
    _config(base_dir, "base")
    model_class = TASK_MODEL_CLASSES.get(config.task_type) or type(load_architecture(base_dir))
    labels = head_label_count(config, load_peft_weights(str(adapter_dir)))
    model = model_class.from_pretrained(base_dir, dtype=torch.float32, **({"num_labels": labels} if labels else {}))
    if targets is None:
        targets = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)
    before = _weights(find_targets(model, targets))
    try:
        merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    except RuntimeError as error:  # torch's load_state_dict: the adapter's tensors do not fit this base
        first_problem = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise ValueError(f"adapter {str(adapter_dir)!r} does not fit base {str(base_dir)!r}: {first_problem}") from None
    after = _weights([(name, merged.get_submodule(name)) for name in before])
    return {name: after[name] - before[name] for name in before}


def deltas_from_file(path: str | os.PathLike, targets: Targets | None = None) -> dict[str, Tensor]:
    """{module name: update} from a safetensors file (updates in (out, in, ...) orientation), in the order its
    `MODULE_ORDER_KEY` metadata records, else in natural name order (layers.2 before layers.10).

    `targets` selects among the names as PEFT would among modules; "all-linear" needs module types, which a
    file does not have.
    """
    path = Path(path)
    if not path.is_file():
        problem = "is not a file" if path.exists() else "does not exist"
        raise ValueError(f"deltas file {str(path)!r} {problem}")
    read_safetensors_header(path)  # a malformed or truncated file is refused here, in one line
    with safe_open(path, framework="pt") as file:
        names = list(file.keys())
        recorded = json.loads((file.metadata() or {}).get(MODULE_ORDER_KEY, "null"))
        if not names:
            raise ValueError(f"deltas file {str(path)!r} holds no tensors")
        if recorded is not None and sorted(recorded) != sorted(names):
            raise ValueError(f"deltas file {str(path)!r}: its recorded module order does not list its tensors")
        names = recorded or sorted(names, key=_natural_key)
        if targets is not None:
            if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
                raise ValueError(f"'{ALL_LINEAR}' needs module types, which a deltas file lacks; name the modules")
            names = [name for name, _ in find_targets(_name_tree(names), targets) if name in set(names)]
            if not names:
                raise ValueError(f"target modules {targets!r} match no tensor of {str(path)!r}")
        deltas = {name: file.get_tensor(name).float() for name in names}
    flat = [name for name, delta in deltas.items() if delta.dim() < 2]
    if flat:
        shape = list(deltas[flat[0]].shape)
        raise ValueError(f"deltas file {str(path)!r}: {flat[0]!r} has shape {shape}, not a matrix")
    return deltas


def is_saved_deltas(path: Path) -> bool:
    """Whether `path` is a file `save_deltas` wrote (a safetensors file recording its module order)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return MODULE_ORDER_KEY in (handle.metadata() or {})
    except Exception:  # noqa: BLE001  (safetensors raises its own error types for a file that is not one of its)
        return False


def save_deltas(path: str | os.PathLike, deltas: Mapping[str, Tensor]) -> None:
    """Write deltas for `deltas_from_file`, recording their order; atomically (temporary file, then rename)."""
    tensors = {name: delta.contiguous() for name, delta in deltas.items()}
    metadata = {MODULE_ORDER_KEY: json.dumps(list(deltas))}
    write_atomic(Path(path), lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def _folder(path: str | os.PathLike, role: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise ValueError(f"{role} folder {str(folder)!r} {problem}")
    return folder


def _config(path: str | os.PathLike, role: str) -> PretrainedConfig:
    folder = _folder(path, role)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{role} folder {str(folder)!r} has no config.json")
    return AutoConfig.from_pretrained(folder)


def _check_same_targets(
    base: list[tuple[str, tuple[int, ...]]], tuned: list[tuple[str, tuple[int, ...]]], base_dir, tuned_dir
) -> None:
    base_shapes, tuned_shapes = dict(base), dict(tuned)
    for name, shape in tuned:
        if name not in base_shapes:
            raise ValueError(f"target module {name!r} of tuned {str(tuned_dir)!r} is not in base {str(base_dir)!r}")
        if base_shapes[name] != shape:
            raise ValueError(
                f"target module {name!r} has update shape {list(base_shapes[name])} in base {str(base_dir)!r} "
                f"but {list(shape)} in tuned {str(tuned_dir)!r}"
            )
    extra = [name for name in base_shapes if name not in tuned_shapes]
    if extra:
        raise ValueError(f"target module {extra[0]!r} of base {str(base_dir)!r} is not in tuned {str(tuned_dir)!r}")


def _target_weights(model_class: type, folder: str | os.PathLike, targets: Targets) -> dict[str, Tensor]:
    """The target weights of a saved model, each checked to come from the checkpoint (not initialized afresh)."""
    model, info = model_class.from_pretrained(folder, dtype="auto", output_loading_info=True)
    found = find_targets(model, targets)
    missing = [name for name, _ in found if f"{name}.weight" in set(info["missing_keys"])]
    if missing:
        raise ValueError(f"model folder {str(folder)!r} has no saved weight for target module {missing[0]!r}")
    return _weights(found)


def _weights(modules: Sequence[tuple[str, nn.Module]]) -> dict[str, Tensor]:
    """Each module's weight in GFA's orientation, as a float32 copy."""
    return {name: op_for(module, name).weight().detach().to(torch.float32, copy=True) for name, module in modules}


def _natural_key(name: str) -> list[tuple[int, str]]:
    return [(int(part), "") if part.isdigit() else (-1, part) for part in name.split(".")]


def _name_tree(names: Sequence[str]) -> nn.Module:
    """An empty module tree with a leaf at every name, so `find_targets` matches names as it matches modules."""
    root = nn.Module()
    for name in names:
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        parent.add_module(leaf, nn.Identity())
    return root
