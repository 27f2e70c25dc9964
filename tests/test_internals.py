"""Each PEFT or torch internal that `gfa_peft.internals` uses still behaves as the package needs.

These are not public API: a new PEFT or torch release may change them. A failure here names the installed
versions, so whoever upgrades knows which internal moved and where (gfa_peft/internals.py) to adapt.
"""

from __future__ import annotations

import json
import pickle

import peft
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils.peft_types import PeftType
from torch import nn

from gfa_peft import GfaConfig, internals

VERSIONS = f"(peft {peft.__version__}, torch {torch.__version__})"


def explain(what: str) -> str:
    return f"{what} changed {VERSIONS}: adapt gfa_peft/internals.py"


def test_added_peft_type_survives_lookup_json_and_pickle():
    member = internals.add_peft_type("GFA")
    assert internals.add_peft_type("GFA") is member, explain("PeftType member reuse")
    assert PeftType("GFA") is member and PeftType["GFA"] is member, explain("PeftType member storage")
    assert member.value == "GFA" and json.dumps(member) == '"GFA"', explain("PeftType values")
    assert pickle.loads(pickle.dumps(member)) is member, explain("PeftType pickling")


def test_all_linear_expansion_names_every_linear_but_the_output_layer():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4))

    expanded = internals.expand_all_linear(LoraConfig(target_modules="all-linear"), Net())
    assert set(expanded.target_modules) == {"body.0", "body.2"}, explain("PEFT's all-linear expansion")
    # a layer an adapter wraps counts by a "Linear" in its wrapper's class name (GfaLinear)
    adapted = get_peft_model(Net(), GfaConfig(r=1, target_modules=["body.0"])).base_model.model
    expanded = internals.expand_all_linear(LoraConfig(target_modules="all-linear"), adapted)
    assert set(expanded.target_modules) == {"body.0", "body.2"}, explain("PEFT's all-linear expansion of adapted layers")


def test_excluded_modules_are_told_apart_from_matches():
    config = LoraConfig(target_modules=["q"], exclude_modules=["layer.q"])
    excluded = check_target_module_exists(config, "layer.q")
    matched = check_target_module_exists(config, "other.q")
    assert internals.is_excluded(excluded), explain("PEFT's excluded-module answer")
    assert matched and not internals.is_excluded(matched), explain("PEFT's excluded-module answer")


def test_callbacks_run_when_the_backward_pass_ends():
    ran = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            internals.run_after_backward(lambda: ran.append("after"))
            ran.append("during")
            return grad * 2

    Probe.apply(torch.ones(2, requires_grad=True)).sum().backward()
    assert ran == ["during", "after"], explain("the autograd engine's queue_callback")


def test_modules_to_save_wrappers_are_recognised():
    from peft.utils.other import ModulesToSaveWrapper

    wrapper = ModulesToSaveWrapper(nn.Linear(2, 2), "default")
    assert internals.is_modules_to_save_wrapper(wrapper), explain("PEFT's AuxiliaryTrainingWrapper")
    assert not internals.is_modules_to_save_wrapper(nn.Linear(2, 2)), explain("PEFT's AuxiliaryTrainingWrapper")


def test_version_counter_counts_in_place_writes():
    tensor = torch.zeros(3)
    before = internals.version_counter(tensor)
    tensor.add_(1)
    tensor[0] = 5
    assert internals.version_counter(tensor) == before + 2, explain("torch's tensor version counter")


@pytest.mark.parametrize("owner, hook", [
    (PeftModel, "_enable_peft_forward_hooks"),
    (BaseTuner, "_cast_adapter_dtype"),
    (BaseTuner, "_remove_adapter_name_from_key"),
    (BaseTuner, "_prepare_adapter_config"),
    (BaseTuner, "_create_and_replace"),
    (BaseTuner, "_replace_module"),
    (BaseTuner, "inject_adapter"),
    (BaseTunerLayer, "_move_adapter_to_device_of_base_layer"),
])
def test_the_tuner_hooks_gfa_overrides_or_calls_still_exist(owner, hook):
    # GfaModel / GfaLayer override or call these underscore-named hooks of PEFT's tuner base classes.
    assert callable(getattr(owner, hook, None)), explain(f"{owner.__name__}.{hook}")
