"""Check a saved GFA adapter file before anything is injected into a model.

PEFT injects an adapter first and reads its weights afterwards, so a missing, truncated, foreign or
mis-shaped weights file would otherwise leave a half-loaded model behind. `GfaConfig.from_pretrained`
runs `check_adapter_file`, which reads only what describes the tensors: a safetensors file's header, or a
PyTorch `.bin` file unpickled safely (`weights_only`) onto the meta device, so no tensor data is read.
It checks the factors' names, dtypes (floating point) and shapes against the config's layout (a config
without one is refused before, by `GfaConfig.from_pretrained`); the tuner checks the shapes against the
model's layout before it injects anything (`check_factor_shapes`), and the saved `modules_to_save`
tensors (e.g. a classifier head for another label count) against the model's (`check_saved_modules`).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass

import torch
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from torch import nn

from gfa_peft.internals import is_modules_to_save_wrapper

FACTOR_KEYS = ("base_model.gfa_B", "base_model.gfa_A")
GAIN_KEY = "base_model.gfa_gain"
"""The N module gains of an adapter with `module_gain`, saved beside the factors."""
ADAPTER_KEYS = (*FACTOR_KEYS, GAIN_KEY)
SAVED_MODEL_PREFIX = "base_model.model."  # a saved `modules_to_save` tensor's key before its parameter name
# Bytes per element of the safetensors dtypes, the floating-point ones first.
FLOAT_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
DTYPE_SIZES = {**FLOAT_DTYPE_SIZES, "BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4,
               "I64": 8, "U64": 8, "C64": 8}


@dataclass(frozen=True)
class SavedTensor:
    """What a weights file says about one tensor, without its data."""

    shape: list[int]
    dtype: str
    floating: bool


def read_safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """The tensor entries of a safetensors file's header, after checking each is well formed (a dtype, a shape
    of non-negative sizes, offsets spanning exactly its bytes) and the file holds all their bytes."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path} is not a safetensors file: it is only {size} bytes long")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise ValueError(f"{path} is truncated or not a safetensors file: its header claims {header_len} bytes")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a safetensors file: unreadable header ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file: its header is not a JSON object")
    entries = {key: value for key, value in header.items() if key != "__metadata__"}
    for key, entry in entries.items():
        problem = _entry_problem(entry)
        if problem:
            raise ValueError(f"{path} is not a valid safetensors file: tensor {key!r} {problem}")
    data_end = max((entry["data_offsets"][1] for entry in entries.values()), default=0)
    if 8 + header_len + data_end != size:
        raise ValueError(
            f"{path} is truncated: its header needs {8 + header_len + data_end} bytes but the file has {size}"
        )
    return entries


def _entry_problem(entry) -> str | None:
    """What is wrong with one safetensors header entry, or None."""
    if not isinstance(entry, dict):
        return "has no description"
    shape, offsets, dtype = entry.get("shape"), entry.get("data_offsets"), entry.get("dtype")
    if not isinstance(dtype, str):
        return "has no dtype"
    if not isinstance(shape, list) or not all(isinstance(size, int) and size >= 0 for size in shape):
        return f"has shape {shape!r}, not a list of sizes"
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(at, int) for at in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        return f"has data offsets {offsets!r}, not [begin, end]"
    if dtype in DTYPE_SIZES and offsets[1] - offsets[0] != math.prod(shape) * DTYPE_SIZES[dtype]:
        return f"claims shape {shape} of {dtype} but spans {offsets[1] - offsets[0]} bytes"
    return None


def saved_tensors(directory: str) -> tuple[str, dict[str, SavedTensor]]:
    """The adapter weights file in `directory` and the name, shape and dtype of every tensor it holds."""
    path = os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)
    if os.path.isfile(path):
        entries = read_safetensors_header(path)
        return path, {key: SavedTensor(entry["shape"], entry["dtype"], entry["dtype"] in FLOAT_DTYPE_SIZES)
                      for key, entry in entries.items()}
    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {SAFETENSORS_WEIGHTS_NAME} (or {WEIGHTS_NAME}) in {directory}")
    try:  # weights_only: no code runs; the meta device: no tensor data is read
        tensors = torch.load(path, map_location="meta", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} is not a readable PyTorch weights file: {first_line}") from None
    if not isinstance(tensors, dict) or not all(isinstance(value, torch.Tensor) for value in tensors.values()):
        raise ValueError(f"{path} does not hold a map of tensor names to tensors")
    return path, {str(key): SavedTensor(list(value.shape), str(value.dtype).removeprefix("torch."),
                                        value.dtype.is_floating_point)
                  for key, value in tensors.items()}


def check_adapter_file(directory: str, r: int, layout: dict, modules_to_save,
                       module_gain: bool = False) -> dict[str, list[int]]:
    """Raise a clear error unless `directory` holds floating-point GFA factors (and module gains when the config
    has `module_gain`), of the shapes its config's layout promises, and nothing foreign. Returns every saved
    tensor's shape by key (the factors', the gains' and those of the `modules_to_save` modules)."""
    path, tensors = saved_tensors(directory)
    expected_keys = ADAPTER_KEYS if module_gain else FACTOR_KEYS
    missing = [key for key in expected_keys if key not in tensors]
    if missing:
        raise ValueError(f"{path} holds no GFA factors (missing {missing}); its keys are {sorted(tensors)[:10]}")
    for key in expected_keys:
        if not tensors[key].floating:
            raise ValueError(f"{path}: {key} holds {tensors[key].dtype} values; GFA factors are floating point")
    shapes = {key: tensor.shape for key, tensor in tensors.items()}
    try:
        m, k, n_modules = int(layout["m"]), int(layout["k"]), len(layout["modules"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"the config in {directory} records a malformed layout (no integer m and k)") from None
    check_factor_shapes(shapes, m, r, k, f"{path}: ", "its config promises", n_modules if module_gain else None)
    allowed = tuple(modules_to_save or ())
    foreign = [key for key in tensors if key not in expected_keys and not any(f".{name}." in key for name in allowed)]
    if foreign:
        raise ValueError(f"{path} holds tensors that belong to no GFA adapter: {foreign[:5]}")
    return shapes


def check_factor_shapes(shapes: dict[str, list[int]], m: int, r: int, k: int, where: str, whose: str,
                        n_modules: int | None = None) -> None:
    """Raise ValueError unless the saved factors are B (m x r) and A (r x k), and the gains (when `n_modules`
    is given: the adapter has `module_gain`) one per module."""
    expected = {"base_model.gfa_B": [m, r], "base_model.gfa_A": [r, k]}
    if n_modules is not None:
        expected[GAIN_KEY] = [n_modules]
    for key, shape in expected.items():
        if list(shapes[key]) != shape:
            raise ValueError(f"{where}{key} has shape {list(shapes[key])}, {whose} {shape}")


def check_saved_modules(model: nn.Module, shapes: dict[str, list[int]], where: str) -> None:
    """Raise ValueError unless every saved `modules_to_save` tensor (a key of `shapes` other than the factors,
    saved as `base_model.model.<parameter name>`) has a counterpart of its shape in `model`: PEFT would
    otherwise find a classifier head for another label count only after injecting the adapter."""
    for key, shape in shapes.items():
        if key in ADAPTER_KEYS:
            continue
        name = key.removeprefix(SAVED_MODEL_PREFIX)
        module_name, _, tensor_name = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            module = None
        if is_modules_to_save_wrapper(module):  # a second adapter: the head is already wrapped
            module = module.original_module
        current = getattr(module, tensor_name, None)
        if not isinstance(current, torch.Tensor):
            raise ValueError(f"{where}its saved {name} has no counterpart in this model")
        if list(current.shape) != list(shape):
            raise ValueError(f"{where}its saved {name} has shape {list(shape)}, this model's has "
                             f"{list(current.shape)} (if it is a classifier head, load the base model with "
                             f"num_labels={shape[0]})")
