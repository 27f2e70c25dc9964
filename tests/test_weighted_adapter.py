"""`add_weighted_adapter`: exact weighted sums of GFA adapters, recompression by SVD, and refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

import gfa_peft
from gfa_peft import GfaConfig, GfaLayer
from references import reference_scale
from test_peft_matrix import apply_deltas, dense_reference_deltas
from toy_models import CASES

pytestmark = pytest.mark.usefixtures("one_thread")
LLAMA = CASES[2]
TARGETS = ["q_proj", "v_proj", "gate_proj"]


def three_adapters():
    """Three trained-looking adapters on one layout, of ranks 2, 3, 1 and different scales."""
    torch.manual_seed(0)
    base = LLAMA.model()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, GfaConfig(r=2, target_modules=TARGETS, init_weights=False))
    model.add_adapter("b", GfaConfig(r=3, target_modules=TARGETS, init_weights=False, scale=0.5))
    model.add_adapter("c", GfaConfig(r=1, target_modules=TARGETS, init_weights=False, scale=2.0))
    return model.eval(), reference


ADAPTERS, WEIGHTS = ["default", "b", "c"], [0.7, -1.5, 0.3]


def dense_product(model, adapter_name) -> torch.Tensor:
    """scale * B A, densely: the m x k matrix whose slices the modules add."""
    B, A = gfa_peft.factors(model, adapter_name)
    return reference_scale(model.peft_config[adapter_name]) * (B.double() @ A.double()).detach()


def test_cat_is_the_exact_weighted_sum_of_updates():
    model, reference = three_adapters()
    model.base_model.add_weighted_adapter(ADAPTERS, WEIGHTS, "mix", combination_type="cat")
    assert gfa_peft.layout_of(model, "mix").r == 6
    mixed = gfa_peft.delta_weights(model, "mix")
    parts = [gfa_peft.delta_weights(model, name) for name in ADAPTERS]
    assert set(mixed) == set(parts[0])
    for module, delta in mixed.items():
        expected = sum(w * part[module] for w, part in zip(WEIGHTS, parts))
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mix." in n)
    # and the model runs with it like a plain model with the summed updates
    model.set_adapter("mix")
    inputs = LLAMA.inputs()
    expected = LLAMA.output(apply_deltas(reference, dense_reference_deltas(model, "mix")), inputs)
    with torch.no_grad():
        torch.testing.assert_close(LLAMA.output(model, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 2, 4, 6])
def test_svd_error_is_the_discarded_spectrum(rank):
    model, _ = three_adapters()
    model.base_model.add_weighted_adapter(ADAPTERS, WEIGHTS, "low", combination_type="svd", svd_rank=rank)
    assert gfa_peft.layout_of(model, "low").r == rank
    target = sum(w * dense_product(model, name) for w, name in zip(WEIGHTS, ADAPTERS))
    singular_values = torch.linalg.svdvals(target)
    error = (target - dense_product(model, "low")).pow(2).sum()
    discarded = singular_values[rank:].pow(2).sum()
    torch.testing.assert_close(error, discarded, rtol=1e-4, atol=1e-9 * target.pow(2).sum().item())
    assert discarded > 0 or rank == 6


def test_svd_rank_defaults_to_the_largest_rank():
    model, _ = three_adapters()
    model.base_model.add_weighted_adapter(ADAPTERS, WEIGHTS, "low")
    assert gfa_peft.layout_of(model, "low").r == 3


def state(model) -> dict:
    return {
        "configs": sorted(model.peft_config),
        "factors": {n: p.detach().clone() for n, p in model.named_parameters() if "gfa_" in n},
        "slices": [sorted(layer.gfa_slice) for layer in model.modules() if isinstance(layer, GfaLayer)],
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert before["configs"] == after["configs"] and before["slices"] == after["slices"]
    assert before["factors"].keys() == after["factors"].keys()
    assert all(torch.equal(before["factors"][n], after["factors"][n]) for n in before["factors"])


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(adapters=["default", "nope"], weights=[1.0, 1.0]), "Adapter nope does not exist"),
        (dict(adapters=["default", "b"], weights=[1.0]), "got 1 weights for 2 adapters"),
        (dict(adapters=["default", "b"], weights=[1.0, 1.0], adapter_name="c"), "Adapter c already exists"),
        (dict(adapters=["default", "other_layout"], weights=[1.0, 1.0]), "needs adapters with one layout"),
        (dict(adapters=[], weights=[]), "at least one adapter"),
        (dict(adapters=["default", "b"], weights=[1.0, 1.0], combination_type="linear"), "Invalid combination_type"),
        (dict(adapters=["default", "b"], weights=[1.0, 1.0], svd_rank=6), "svd_rank=6 is out of range"),
    ],
)
def test_refusals_leave_the_model_unchanged(arguments, message):
    model, _ = three_adapters()
    model.add_adapter("other_layout", GfaConfig(r=1, target_modules=["q_proj", "v_proj"]))
    before = state(model)
    with pytest.raises(ValueError, match=message):
        model.base_model.add_weighted_adapter(**{"adapter_name": "mix", **arguments})
    assert_same_state(before, state(model))


def test_refuses_adapters_with_modules_to_save():
    case = CASES[4]
    model = get_peft_model(case.model(), GfaConfig(r=2, **case.config))
    model.add_adapter("other", GfaConfig(r=2, **case.config))
    before = state(model)
    with pytest.raises(ValueError, match="has modules_to_save"):
        model.base_model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    assert_same_state(before, state(model))
