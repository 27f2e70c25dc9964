"""GFA under DDP and FSDP2 on two CPU processes (gloo, loopback), against a single-process run.

One pair of processes runs every scenario (starting Python with torch twice is the slow part);
each test then checks one scenario's outcome.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import gfa_peft
from gfa_peft import GfaConfig, GfaLayer
from gfa_peft.adapters.distributed import (
    RankMismatchError,
    check_ranks_agree,
    fully_shard_gfa,
    gather_in_rank_order,
    per_rank_batch,
    shard_for_rank,
    transformer_blocks,
)
from spawn_ranks import run_ranks
from toy_models import tiny_llama

WORLD = 2
GLOBAL_BATCH = 4
STEPS = 3


def build(**overrides):
    torch.manual_seed(0)
    return get_peft_model(tiny_llama(), GfaConfig(**{"r": 2, "target_modules": ["q_proj", "v_proj"], **overrides}))


def global_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(1, 64, (GLOBAL_BATCH, 9), generator=generator) for _ in range(STEPS)]


def share(ids: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    size = per_rank_batch(len(ids), world)
    return ids[rank * size : (rank + 1) * size]


def train(model, batches) -> None:
    """AdamW on the causal-LM loss; every rank's batch has the same token count, so averaging the
    per-rank mean losses (what DDP and FSDP do to gradients) equals the global mean."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def ddp_run(rank, world):
    model = build()
    check_ranks_agree(model, {"global_batch": GLOBAL_BATCH})
    train(DistributedDataParallel(model), [share(ids, rank, world) for ids in global_batches()])
    return [p.detach().clone() for p in gfa_peft.factors(model)]


def fsdp_run(rank, world):
    model = build()
    check_ranks_agree(model, {"global_batch": GLOBAL_BATCH})
    fully_shard_gfa(model)
    seen_by_layers = []

    def record(module, args):
        B = module.gfa_B["default"].weight
        seen_by_layers.append((isinstance(B, DTensor), tuple(B.shape)))

    for module in model.modules():
        if isinstance(module, GfaLayer):
            module.register_forward_pre_hook(record)
    factors_at_rest = [(isinstance(p, DTensor), tuple(p.to_local().shape)) for p in gfa_peft.factors(model)]
    train(model, [share(ids, rank, world) for ids in global_batches()])
    return {
        "factors": [p.detach().full_tensor() for p in gfa_peft.factors(model)],
        "factors_at_rest": factors_at_rest,
        "seen_by_layers": seen_by_layers,
    }


def mismatch_run(rank, world, overrides, settings):
    model = build(**(overrides if rank == 1 else {}))
    try:
        check_ranks_agree(model, settings if rank == 1 else {})
    except RankMismatchError as error:
        return str(error)
    return None


MISMATCHES = {
    "module_order": ({"module_order": "by_name"}, {}),
    "config": ({"scale": 2.0}, {}),
    "settings": ({}, {"global_batch": 6}),
}


def evaluation_shares(rank, world):
    """Each rank predicts (here: multiplies by 10) its share of 5 examples; all get every prediction, in order."""
    share = shard_for_rank(Dataset.from_dict({"x": list(range(5))}))["x"]
    return share, gather_in_rank_order([value * 10 for value in share])


def all_scenarios(rank, world):
    outcomes = {"ddp": ddp_run(rank, world), "fsdp": fsdp_run(rank, world), "shares": evaluation_shares(rank, world)}
    for name, (overrides, settings) in MISMATCHES.items():
        outcomes[name] = mismatch_run(rank, world, overrides, settings)
    return outcomes


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    outcomes = run_ranks(all_scenarios, WORLD, tmp_path_factory.mktemp("ranks"), timeout_s=120)
    errors = [outcome["traceback"] for outcome in outcomes if "error" in outcome]
    assert not errors, "\n".join(errors)
    return [outcome["result"] for outcome in outcomes]


@pytest.fixture(scope="module")
def single_process_factors():
    model = build()
    train(model, global_batches())
    return [p.detach() for p in gfa_peft.factors(model)]


def test_ddp_matches_single_process_on_the_global_batch(ranks, single_process_factors):
    for rank in ranks:
        for ours, reference in zip(rank["ddp"], single_process_factors):
            assert not torch.equal(reference, torch.zeros_like(reference))
            torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_fsdp2_matches_single_process_and_gathers_factors_for_every_layer(ranks, single_process_factors):
    (m, r), k = single_process_factors[0].shape, single_process_factors[1].shape[1]
    for rank in ranks:
        outcome = rank["fsdp"]
        for ours, reference in zip(outcome["factors"], single_process_factors):
            torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
        # Sharded (half of B's rows each) between steps, whole and plain when a layer reads them.
        assert outcome["factors_at_rest"] == [(True, (m // WORLD, r)), (True, (r // WORLD, k))]
        assert len(outcome["seen_by_layers"]) == 4 * STEPS
        assert set(outcome["seen_by_layers"]) == {(False, (m, r))}


@pytest.mark.parametrize(
    "scenario, expected",
    [
        ("module_order", "rank 1 has module #1 = 'model.layers.1.self_attn.q_proj'"),
        ("config", "rank 1 has GfaConfig.scale=2.0 where rank 0 has 1.0"),
        ("settings", "rank 1 has global_batch=6 where rank 0 has None"),
    ],
)
def test_disagreeing_ranks_all_raise_naming_the_difference(ranks, scenario, expected):
    messages = [rank[scenario] for rank in ranks]
    assert messages[0] == messages[1] and messages[0] is not None
    assert expected in messages[0]


def test_each_rank_evaluates_its_share_and_all_get_every_prediction_in_order(ranks):
    assert [rank["shares"][0] for rank in ranks] == [[0, 1, 2], [3, 4]]
    assert [rank["shares"][1] for rank in ranks] == [[0, 10, 20, 30, 40]] * 2


def test_per_rank_batch_refuses_a_world_size_that_does_not_divide_the_batch():
    assert per_rank_batch(8, 2) == 4
    with pytest.raises(ValueError, match="global batch of 6 does not split evenly over 4 processes"):
        per_rank_batch(6, 4)


def test_single_process_check_passes_and_blocks_are_found():
    model = build()
    check_ranks_agree(model, {"global_batch": 4})
    assert [type(block).__name__ for block in transformer_blocks(model)] == ["LlamaDecoderLayer"] * 2
