"""Reuse of a module's adapted weight between forward passes that need no gradient for it.

Training re-forms W + s * slice(B A) in every forward (the factors change every step). At
inference the factors stay put, so a `GfaLayer` keeps the tensor it ran with and reuses it. The
reuse is exact: an entry is the very tensor the uncached forward would form, built by the same
code under the same autocast and inference-mode state, and it is rebuilt whenever any tensor it
was formed from changed. A tensor counts as changed when its storage (`data_ptr`), its version
counter (bumped by every in-place write through the tensor: an optimiser step, `load_state_dict`,
`copy_`), its dtype, device or shape differ from when the entry was built.

Writes through `.data` (e.g. `param.data.copy_(...)`) bypass the version counter; the layer also
drops every entry on merge, unmerge, `set_adapter`, `delete_adapter`, adding an adapter and
`model.train()`, so only a `.data` write between two eval forwards with nothing else in between
would go unseen. `GfaModel.clear_inference_cache()` drops everything explicitly.

Memory: one entry holds one p x q tensor (the module's weight size) per adapter combination run
(the active adapters, or each adapter of a mixed batch), e.g. the size of the adapted weights
once more for a single adapter. Turn it off per adapter with `GfaConfig(cache_inference_update=False)`
or for the process with the environment variable `GFA_INFERENCE_CACHE=0`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence

import torch

ENVIRONMENT_SWITCH = "GFA_INFERENCE_CACHE"


def enabled_by_environment() -> bool:
    """False when `GFA_INFERENCE_CACHE` is 0/false/no/off; read at every call so it can be flipped at run time."""
    return os.environ.get(ENVIRONMENT_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def stamp(sources: Sequence[torch.Tensor], like: torch.Tensor) -> tuple:
    """Everything the cached tensor depends on besides the code: the sources' identity and contents
    version, the dtype it is formed in, and the autocast and inference-mode state around it."""
    device_type = like.device.type
    context = (
        like.dtype,
        torch.is_inference_mode_enabled(),
        torch.is_autocast_enabled(device_type),
        torch.get_autocast_dtype(device_type),
    )
    identity = tuple((t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in sources)
    return context + identity


class InferenceCache:
    """Tensors built from `sources`, keyed by the adapters they combine, rebuilt when a stamp differs."""

    def __init__(self):
        self.entries: dict[Hashable, tuple[tuple, tuple[torch.Tensor, ...]]] = {}

    def get(
        self,
        key: Hashable,
        sources: Sequence[torch.Tensor],
        like: torch.Tensor,
        build: Callable[[], tuple[torch.Tensor, ...]],
    ) -> tuple[torch.Tensor, ...]:
        current = stamp(sources, like)
        entry = self.entries.get(key)
        if entry is not None and entry[0] == current:
            return entry[1]
        self.entries.pop(key, None)  # free the stale tensors before building new ones
        with torch.no_grad():
            tensors = build()
        self.entries[key] = (current, tensors)
        return tensors

    def clear(self) -> None:
        self.entries.clear()

    def __len__(self) -> int:
        return len(self.entries)
