"""GFA on several processes: checks that every rank agrees, and sharding with FSDP2.

GFA's factors B and A are shared by every adapted layer and owned by the tuner, not by any layer.
Data parallelism (DDP) needs nothing special for that: a factor used by many layers gets one
summed gradient, which DDP all-reduces once. What it does need is that every rank built the same
adapter: the layout decides which slice of B A each module reads, so two ranks with a different
module order would average gradients of different things without any error. `check_ranks_agree`
compares the layouts, configs and settings of all ranks before training starts and raises the
same error on every rank, so nobody is left waiting in a collective.

Under FSDP2 the factors belong to the root unit (the tuner sits above every transformer block):
`fully_shard_gfa` shards each block and then the root, so the factors are gathered when the
root's forward starts, before any layer reads them, and their gradient (summed over every layer
that used them) is reduce-scattered with the root unit's other gradients after the backward.

The rest serves `gfa train` under `torchrun`: the global batch split over the processes, the
evaluation split shared out and gathered back in order, and a Trainer whose example order does
not depend on the number of processes (docs/distributed.md).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from gfa_peft.introspect import layout_of
from gfa_peft.tuner.config import GFA_PEFT_TYPE


class RankMismatchError(RuntimeError):
    """The processes of one job built different GFA adapters or got different settings."""


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_rank() -> int:
    """This process's rank as `torchrun` or `accelerate launch` set it (RANK), 0 when not launched so; known
    before any process group exists."""
    return int(os.environ.get("RANK", "0"))


def launched_world_size() -> int:
    """How many processes `torchrun` or `accelerate launch` started (their WORLD_SIZE), 1 when not launched so.

    Known before any process group exists, so settings can be checked before anything starts."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def accelerator_available() -> bool:
    """Whether torch sees an accelerator (CUDA, XPU, MPS, ...) this process could train on."""
    if hasattr(torch, "accelerator"):  # torch >= 2.6
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """The batch each of `world_size` ranks trains on; a ValueError unless it divides `global_batch`.

    Every rank computes the same answer from the same numbers, so every rank raises together.
    """
    if global_batch < 1 or world_size < 1:
        raise ValueError(f"the global batch ({global_batch}) and world size ({world_size}) must be positive")
    if global_batch % world_size:
        raise ValueError(
            f"a global batch of {global_batch} does not split evenly over {world_size} processes; "
            f"use a multiple of {world_size}"
        )
    return global_batch // world_size


def adapter_description(model: nn.Module) -> dict[str, dict[str, Any]]:
    """What must be identical on every rank: each GFA adapter's layout (module order, shapes,
    offsets) and config, by adapter name. Adapters of other methods and plain models give {}."""
    described = {}
    for name, config in sorted(getattr(model, "peft_config", {}).items()):
        if config.peft_type != GFA_PEFT_TYPE:
            continue
        fields = {key: value for key, value in config.to_dict().items() if key != "layout"}
        described[name] = {"layout": layout_of(model, name).to_dict(), "config": fields}
    return described


def check_ranks_agree(model: nn.Module, settings: dict[str, Any] | None = None, group=None) -> None:
    """Raise `RankMismatchError` on every rank unless all ranks have the same GFA adapters and settings.

    `settings` holds anything else the ranks must share (global batch, seed, steps, ...). One
    `all_gather_object` collects every rank's description; each rank then finds the same
    differences, so all raise (or all go on) together and none is left waiting. Call it after
    the adapter is built and before the model is wrapped for DDP or FSDP.
    """
    mine = {"settings": dict(settings or {}), "adapters": adapter_description(model)}
    _, world = rank_and_world()
    everyone: list[dict | None] = [None] * world
    if world == 1:
        everyone = [mine]
    else:
        dist.all_gather_object(everyone, mine, group=group)
    problems = [
        f"rank {rank} {problem}"
        for rank, theirs in enumerate(everyone)
        if (problem := first_difference(everyone[0], theirs)) is not None
    ]
    if problems:
        raise RankMismatchError("the ranks disagree on the GFA setup, compared with rank 0: " + "; ".join(problems))


def first_difference(reference: dict, other: dict) -> str | None:
    """A phrase naming the first way a rank's description differs from rank 0's (`reference`), or None."""
    settings, theirs = reference["settings"], other["settings"]
    for key in sorted(set(settings) | set(theirs), key=str):
        if settings.get(key) != theirs.get(key):
            return f"has {key}={theirs.get(key)!r} where rank 0 has {settings.get(key)!r}"
    if sorted(reference["adapters"]) != sorted(other["adapters"]):
        return f"has GFA adapters {sorted(other['adapters'])} where rank 0 has {sorted(reference['adapters'])}"
    for name, ours in reference["adapters"].items():
        problem = _layout_difference(ours["layout"], other["adapters"][name]["layout"])
        if problem is None:
            problem = _config_difference(ours["config"], other["adapters"][name]["config"])
        if problem is not None:
            return f"{problem} (adapter {name!r})"
    return None


def _layout_difference(ours: dict, theirs: dict) -> str | None:
    for index, (mine, other) in enumerate(zip(ours["modules"], theirs["modules"])):
        if mine != other:
            name, shape, offset = other
            return (
                f"has module #{index} = {name!r} with update shape {shape} at offset {offset}, where rank 0 has "
                f"{mine[0]!r} with update shape {mine[1]} at offset {mine[2]}"
            )
    if len(ours["modules"]) != len(theirs["modules"]):
        return f"lays out {len(theirs['modules'])} modules where rank 0 lays out {len(ours['modules'])}"
    return None


def _config_difference(ours: dict, theirs: dict) -> str | None:
    for key in sorted(set(ours) | set(theirs)):
        if ours.get(key) != theirs.get(key):
            return f"has GfaConfig.{key}={theirs.get(key)!r} where rank 0 has {ours.get(key)!r}"
    return None


def shard_for_rank(items):
    """This rank's contiguous share of a `datasets.Dataset` (all of it in a single process); the shares of
    ranks 0, 1, ... concatenated give the whole, in order."""
    rank, world = rank_and_world()
    return items if world == 1 else items.shard(num_shards=world, index=rank, contiguous=True)


def gather_in_rank_order(items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank."""
    _, world = rank_and_world()
    if world == 1:
        return list(items)
    everyone: list[list | None] = [None] * world
    dist.all_gather_object(everyone, list(items))
    return [item for part in everyone for item in part]


class GlobalBatchTrainer(Trainer):
    """transformers' Trainer, except that length-grouped sampling groups over the global batch.

    transformers sizes the length groups by the per-process batch, so the order of the examples,
    and with it every global batch, would change with the number of processes. Grouped over the
    global batch, N processes taking consecutive shares of the index stream see exactly the
    global batches one process sees.
    """

    def _get_train_sampler(self, *args, **kwargs):
        sampler = super()._get_train_sampler(*args, **kwargs)
        if isinstance(sampler, LengthGroupedSampler):
            sampler.batch_size *= self.args.world_size
        return sampler


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model (its `_no_split_modules` classes, e.g. LlamaDecoderLayer)."""
    block_names = set()
    for module in model.modules():
        block_names.update(getattr(module, "_no_split_modules", None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in block_names]
    if not blocks:
        raise ValueError(
            f"found no transformer blocks to shard in {type(model).__name__}: its classes declare no "
            "_no_split_modules; pass the blocks explicitly"
        )
    return blocks


def fully_shard_gfa(model: nn.Module, blocks: list[nn.Module] | None = None, **fsdp_options) -> nn.Module:
    """Shard a GFA `PeftModel` with FSDP2: one unit per transformer block, then the root.

    The root unit holds everything outside the blocks, the GFA factors included, so they are
    all-gathered when the root's forward starts (before any adapted layer reads them) and their
    gradient, summed over all layers, is reduce-scattered once after the backward. `fsdp_options`
    go to every `fully_shard` call (e.g. `mp_policy`, `reshard_after_forward`). Returns `model`,
    sharded in place.
    """
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6 keeps FSDP2 under its original name
        from torch.distributed._composable.fsdp import fully_shard
    blocks = transformer_blocks(model) if blocks is None else blocks
    for block in reversed(blocks):  # inner units before the units around them (modules() lists parents first)
        fully_shard(block, **fsdp_options)
    fully_shard(model, **fsdp_options)
    return model
