"""Reuse of a module's adapted weight between forward passes that need no gradient for it.

Training re-forms W + s * slice(B A) in every forward (the factors change every step). At
inference the factors stay put, so a `GfaLayer` keeps the tensor it ran with and reuses it. The
reuse is exact: an entry is the very tensor the uncached forward would form, built by the same
code under the same autocast and inference-mode state, and it is rebuilt whenever what it was
formed from may have changed. The rule differs for the two kinds of source:

- The factors B and A (small: r (m + k) numbers an adapter) are compared by their contents. Each
  factor keeps one copy of the contents it had when last checked (one copy per adapter, shared by
  every layer), and before an entry is reused the factor is compared with that copy bit for bit.
  This sees every way a factor can change: optimiser steps (fused ones included, which do not bump
  PyTorch's version counters), `load_state_dict` / `set_peft_model_state_dict` / `load_adapter`
  (also with `assign=True` / `low_cpu_mem_usage=True`, whose fresh tensors can land at a freed
  address with a fresh version counter), writes through `.data`, a numpy view or `set_`. The
  comparison runs once per forward pass of the whole model (the tuner marks each pass with hooks on
  the model) for each adapter used, or once per call for a layer called on its own; a factor written
  in the middle of a pass (by a forward hook, say) is seen from the next pass on. Cost: the copy,
  and a comparison of r (m + k) numbers per pass and adapter (under 1% of a SmolLM2 decode forward
  at batch 1 and r = 126 on one CPU thread, docs/bench.md; on a GPU the host waits for its result).
- The base weight W (weight-sized, too large to copy) is identified instead: the tensor object itself
  (held by a weak reference, so a new tensor at a freed address is not taken for it), its version
  counter (bumped by every in-place write through it: `copy_`, `add_`, torch's `load_state_dict`),
  storage address, dtype, device and shape. Every step of a `torch.optim.Optimizer` (PyTorch's global
  step hook, which fused optimisers, whose writes keep the version, go through too) invalidates every
  entry of the process (an optimiser that is no `torch.optim.Optimizer` is seen only through the
  versions), and a `load_state_dict` reaching the layer (from the model or any module
  above it) those of the layer, which covers a base layer whose own loader writes through `.data`.
  Any other write to a base weight through `.data` or a numpy view is not seen: no cheap rule
  can see it. After one, call `GfaModel.clear_inference_cache()`.

The layer also drops every entry on merge, unmerge, `set_adapter`, `delete_adapter`, adding an
adapter and `model.train()`.

Memory: one entry holds one p x q tensor (the module's weight size) per adapter combination run
(the active adapters, or each adapter of a mixed batch), e.g. the size of the adapted weights
once more for a single adapter; plus the one copy of each adapter's factors. Turn it off per
adapter with `GfaConfig(cache_inference_update=False)` or for the process with the environment
variable `GFA_INFERENCE_CACHE=0`.
"""

from __future__ import annotations

import itertools
import os
import weakref
from collections.abc import Callable, Hashable

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from gfa_peft.internals import version_counter

ENVIRONMENT_SWITCH = "GFA_INFERENCE_CACHE"

# Integer dtypes of each element size: comparing through them compares bits, so -0.0 differs from 0.0
# (they can give different products) and a NaN equals itself (torch.equal would never reuse it).
_BITS_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

_optimizer_steps = 0
_contents_ids = itertools.count(1)


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


# Process-wide: any optimiser may hold a base weight (fused ones write it without bumping its version).
register_optimizer_step_post_hook(_count_optimizer_step)


def enabled_by_environment() -> bool:
    """False when `GFA_INFERENCE_CACHE` is 0/false/no/off; read at every call so it can be flipped at run time."""
    return os.environ.get(ENVIRONMENT_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def same_bits(tensor: torch.Tensor, copy: torch.Tensor) -> bool:
    """Whether `tensor` holds exactly `copy`'s bits, in the same dtype, device and shape."""
    if (tensor.dtype, tensor.device, tensor.shape) != (copy.dtype, copy.device, copy.shape):
        return False
    bits = _BITS_OF_SIZE[tensor.element_size()]
    return torch.equal(tensor.detach().view(bits), copy.view(bits))


class ModelForward:
    """Which forward pass of the whole model is running (None between passes), set by hooks on the model."""

    def __init__(self):
        self.current: object | None = None
        self._handles: list = []

    def watch(self, model: nn.Module) -> None:
        # Bound methods, so that a deep copy of the model marks the copy's own passes.
        self._handles = [
            model.register_forward_pre_hook(self._begin),
            model.register_forward_hook(self._end, always_call=True),
        ]

    def unwatch(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _begin(self, model: nn.Module, args: tuple) -> None:
        self.current = object()

    def _end(self, model: nn.Module, args: tuple, output: object) -> None:
        self.current = None


class FactorContents:
    """A copy of one factor's contents, and an id that changes whenever the factor is found to differ from it."""

    def __init__(self, model_forward: ModelForward):
        self.id = 0
        self._model_forward = model_forward
        self._copy: torch.Tensor | None = None
        self._checked_in: object | None = None  # the model pass it was last compared in (held, so never reused)

    def current_id(self, factor: torch.Tensor) -> int:
        """The id of `factor`'s contents, compared once per pass of the model (at every call outside one)."""
        model_pass = self._model_forward.current
        if model_pass is not None and model_pass is self._checked_in:
            return self.id
        if self._copy is None or not same_bits(factor, self._copy):
            with torch.no_grad():
                self._copy = factor.detach().clone()
            self.id = next(_contents_ids)
        self._checked_in = model_pass
        return self.id


def stamp(base_weight: torch.Tensor, factor_ids: tuple[int, ...], like: torch.Tensor) -> tuple:
    """Everything the cached tensor depends on besides the code and the base weight's object: the
    base weight's version and layout, the factors' contents ids, the optimiser steps taken, the dtype
    it is formed in, and the autocast and inference-mode state around it."""
    device_type = like.device.type
    context = (
        like.dtype,
        torch.is_inference_mode_enabled(),
        torch.is_autocast_enabled(device_type),
        torch.get_autocast_dtype(device_type),
        _optimizer_steps,
    )
    base = (base_weight.data_ptr(), version_counter(base_weight), base_weight.dtype, base_weight.device,
            base_weight.shape)
    return context + base + factor_ids


class InferenceCache:
    """Tensors built from a base weight and factors, keyed by the adapters they combine, rebuilt when a stamp
    differs or the base weight is another tensor object."""

    def __init__(self):
        self.entries: dict[Hashable, tuple[tuple, weakref.ref, tuple[torch.Tensor, ...]]] = {}

    def get(
        self,
        key: Hashable,
        base_weight: torch.Tensor,
        factor_ids: tuple[int, ...],
        like: torch.Tensor,
        build: Callable[[], tuple[torch.Tensor, ...]],
    ) -> tuple[torch.Tensor, ...]:
        current = stamp(base_weight, factor_ids, like)
        entry = self.entries.get(key)
        if entry is not None and entry[0] == current and entry[1]() is base_weight:
            return entry[2]
        self.entries.pop(key, None)  # free the stale tensors before building new ones
        with torch.no_grad():
            tensors = build()
        self.entries[key] = (current, weakref.ref(base_weight), tensors)
        return tensors

    def clear(self) -> None:
        self.entries.clear()

    def __getstate__(self) -> dict:
        return {"entries": {}}  # a saved or copied model rebuilds its entries (they hold weak references)

    def __len__(self) -> int:
        return len(self.entries)
