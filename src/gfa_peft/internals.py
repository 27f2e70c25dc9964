"""Every place gfa-peft leans on a PEFT or PyTorch internal, each with the reason it must.

Nothing here is public API of those libraries, so a release may change it without notice.
`tests/test_internals.py` checks each one and fails naming the installed PEFT and torch versions,
so such a change is found by the test suite rather than by a user. PEFT is imported inside the
functions, so the pure-torch core (scatter) can use this module without importing PEFT.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def add_peft_type(name: str):
    """The member `name` of PEFT's closed `PeftType` enum, added if PEFT does not ship one.

    `peft.utils.register_peft_method` accepts only names that are members of `PeftType`, and
    transformers' PEFT integration reads `config.peft_type.value`, so a plain string will not do.
    The member is stored the way `enum` itself stores members, which survives json, pickle and
    `PeftType(name)`. If a future PEFT ships the member, it is reused.
    """
    from peft.utils.peft_types import PeftType

    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def expand_all_linear(config, model: nn.Module):
    """`config` with target_modules="all-linear" replaced by the module names PEFT's LoRA would pick.

    PEFT keeps this in a private helper; calling it makes "all-linear" select exactly the modules it
    selects for LoRA, DoRA, VeRA and VB-LoRA, so budgets are counted over the same set. A linear layer an
    adapter already wraps counts when the wrapper's class name contains "Linear" (PEFT's convention, hence
    GFA's `GfaLinear`), so a second adapter reaches it as LoRA's second adapter does.
    """
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    return _maybe_include_all_linear_layers(config, model)


def is_excluded(match: object) -> bool:
    """Whether PEFT's `check_target_module_exists` answered "excluded by exclude_modules".

    PEFT signals that with an instance of a private class rather than False, so that its own
    error message can tell "excluded" from "not matched"; a plain truth test would take it as a match.
    """
    from peft.tuners.tuners_utils import _ExcludedModule

    return isinstance(match, _ExcludedModule)


def is_modules_to_save_wrapper(module: nn.Module) -> bool:
    """Whether `module` is PEFT's wrapper of a `modules_to_save` module (e.g. a classifier head).

    Mixed-adapter batches must route `adapter_names` to those wrappers too, so each row's head is its
    adapter's; PEFT exposes their common base class only from `peft.utils.other`.
    """
    from peft.utils.other import AuxiliaryTrainingWrapper

    return isinstance(module, AuxiliaryTrainingWrapper)


def version_counter(tensor: torch.Tensor) -> int:
    """How many in-place writes `tensor`'s storage has had (not counting writes through `.data`).

    The inference reuse of an adapted weight is valid only while its factors and base weight are unchanged;
    autograd's own version counter is the one cheap, exact record of in-place edits PyTorch keeps.
    """
    return tensor._version


def run_after_backward(callback: Callable[[], None]) -> None:
    """Run `callback` once the autograd engine finishes the backward pass under way.

    PyTorch exposes this only through the engine object; the scatter's CPU workspace uses it to
    free its scratch buffer as soon as the backward pass that needed it ends.
    """
    torch.autograd.Variable._execution_engine.queue_callback(callback)
