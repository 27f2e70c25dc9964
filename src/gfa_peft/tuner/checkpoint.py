"""Check a saved GFA adapter file before anything is injected into a model.

PEFT injects an adapter first and reads its weights afterwards, so a missing, truncated or
foreign weights file would otherwise leave a half-loaded model behind. `GfaConfig.from_pretrained`
runs this check, which reads only the file's header.
"""

from __future__ import annotations

import json
import os
import struct

from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

FACTOR_KEYS = ("base_model.gfa_B", "base_model.gfa_A")


def read_safetensors_header(path: str) -> dict[str, dict]:
    """The tensor entries of a safetensors file's header, after checking the file holds all their bytes."""
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
    entries = {key: value for key, value in header.items() if key != "__metadata__"}
    data_end = max((entry["data_offsets"][1] for entry in entries.values()), default=0)
    if 8 + header_len + data_end != size:
        raise ValueError(
            f"{path} is truncated: its header needs {8 + header_len + data_end} bytes but the file has {size}"
        )
    return entries


def check_adapter_file(directory: str, r: int, layout: dict | None, modules_to_save) -> None:
    """Raise a clear error unless `directory` holds GFA factors of the shapes its config promises."""
    path = os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(directory, WEIGHTS_NAME)):
            return  # a pickled checkpoint: torch.load validates it as it reads
        raise FileNotFoundError(f"no {SAFETENSORS_WEIGHTS_NAME} (or {WEIGHTS_NAME}) in {directory}")
    entries = read_safetensors_header(path)
    missing = [key for key in FACTOR_KEYS if key not in entries]
    if missing:
        raise ValueError(f"{path} holds no GFA factors (missing {missing}); its keys are {sorted(entries)[:10]}")
    if layout is not None:
        expected = {"base_model.gfa_B": [layout["m"], r], "base_model.gfa_A": [r, layout["k"]]}
        for key, shape in expected.items():
            if entries[key]["shape"] != shape:
                raise ValueError(f"{path}: {key} has shape {entries[key]['shape']}, its config promises {shape}")
    allowed = tuple(modules_to_save or ())
    foreign = [key for key in entries if key not in FACTOR_KEYS and not any(f".{name}." in key for name in allowed)]
    if foreign:
        raise ValueError(f"{path} holds tensors that belong to no GFA adapter: {foreign[:5]}")
