"""Run a function on several CPU processes joined by a gloo process group on the loopback interface.

Each rank's return value (or its exception, as text) comes back to the caller; processes that
outlive the deadline are killed, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def loopback_environment(port: int) -> dict[str, str]:
    """What torch.distributed's env:// rendezvous needs to stay on this machine's loopback interface."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    if sys.platform.startswith("linux"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def _rank_main(function, rank, world_size, port, folder, kwargs, collective_timeout_s):
    os.environ.update(loopback_environment(port))
    torch.set_num_threads(1)
    outcome: dict[str, Any]
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=collective_timeout_s)
        )
        try:
            outcome = {"result": function(rank, world_size, **kwargs)}
        finally:
            dist.destroy_process_group()
    except Exception as error:  # reported to the parent, which decides what is expected
        outcome = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    torch.save(outcome, Path(folder) / f"rank{rank}.pt")
    # The outcome is on disk; skipping the interpreter's teardown of torch and transformers saves ~5 s.
    os._exit(0)


def run_ranks(
    function: Callable[..., Any], world_size: int, folder: Path, timeout_s: float = 120, **kwargs
) -> list[dict[str, Any]]:
    """Run `function(rank, world_size, **kwargs)` on `world_size` processes; per rank {"result": ...} or
    {"error": "Type: message", "traceback": ...}. `function` must be importable (module level)."""
    context = multiprocessing.get_context("spawn")
    port = free_port()
    processes = [
        context.Process(
            target=_rank_main,
            args=(function, rank, world_size, port, str(folder), kwargs, max(10, timeout_s / 2)),
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    for process in processes:
        process.join(max(0.0, (deadline - datetime.datetime.now()).total_seconds()))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for rank in hung:
        processes[rank].kill()
        processes[rank].join()
    if hung:
        raise TimeoutError(f"ranks {hung} were still running after {timeout_s} s")
    outcomes = []
    for rank in range(world_size):
        path = Path(folder) / f"rank{rank}.pt"
        if not path.exists():
            raise RuntimeError(f"rank {rank} exited with code {processes[rank].exitcode} and reported nothing")
        outcomes.append(torch.load(path, weights_only=False))
    return outcomes
