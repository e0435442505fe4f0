"""Multi-process data-parallel training with torch.distributed (gloo on CPU, nccl on GPU).

Two ways in: ``vbd train --nproc N`` spawns N local workers, and
``torchrun --nproc-per-node N -m vbdropout train ...`` starts them itself (the
environment then carries RANK and WORLD_SIZE). Every worker sees the same
shuffled order of the training set and takes its share of each global batch,
so ``--batch-size`` is the global batch. The data term is each worker's mean
cross-entropy and DDP averages the gradients, which gives the gradient of the
global batch mean; the KL enters every worker as β·KL/N, and averaging leaves
it unchanged — the SGVLB of one process with the same global batch. Only rank
0 takes the run lock and writes files.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = [
    "World",
    "all_gather_rng_state",
    "all_mean",
    "barrier",
    "current",
    "init_from_env",
    "spawn",
]


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> World:
    """This process's place in the process group (rank 0 of 1 without one)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_from_env(device: torch.device) -> World:
    """Join the process group described by torchrun's environment, if there is one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not dist.is_initialized():
        rank = int(os.environ["RANK"])
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        dist.init_process_group(_backend(device), timeout=timedelta(minutes=30))
    return current()


def all_mean(values: dict[str, float]) -> dict[str, float]:
    """Average float statistics over the workers (identity in one process)."""
    world = current()
    if world.size == 1:
        return values
    # NCCL reduces only GPU tensors (gloo CPU ones)
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else None
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(values, (tensor / world.size).tolist(), strict=True))


def barrier() -> None:
    """Wait for every worker (no-op in one process)."""
    if current().size > 1:
        dist.barrier()


def all_gather_rng_state() -> list[torch.Tensor] | None:
    """Every worker's torch RNG state, for the checkpoint (``None`` in one process)."""
    if current().size == 1:
        return None
    states: list[Any] = [None] * current().size
    dist.all_gather_object(states, torch.get_rng_state())
    return states


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, size: int, port: int, backend: str, fn: Callable[..., Any], args: tuple
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size)
    )
    dist.init_process_group(backend, rank=rank, world_size=size, timeout=timedelta(minutes=30))
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()
    # The run is finished and written. Leave without the interpreter's teardown: a
    # worker was seen, rarely, to abort in it ("terminate called without an active
    # exception", SIGABRT of rank 1 after a complete run), which failed the run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(size: int, device: torch.device, fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` in ``size`` local worker processes joined in a process group."""
    mp.spawn(_worker, args=(size, _free_port(), _backend(device), fn, args), nprocs=size, join=True)
