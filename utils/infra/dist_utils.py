"""Distributed helpers for `torchrun` (env://): process-group set-up, barriers, reductions.

One process per device. `torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; older launchers pass `--local_rank` or `--local-rank` instead of LOCAL_RANK.
NCCL is used on GPUs, gloo on CPU. A single process without those variables runs unchanged.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from utils.infra.errors import UserError
from utils.infra.flags import setup_logging

__all__ = [
    "DistInfo",
    "all_reduce_sum",
    "barrier",
    "cleanup",
    "init_distributed",
    "main_process_first",
    "run_distributed",
    "unwrap",
]

logger = logging.getLogger(__name__)

CPU = torch.device("cpu")
TIMEOUT = datetime.timedelta(minutes=30)  # of a collective
_joined = 0  # init_distributed calls not yet matched by cleanup, under torchrun
T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its global rank (0 alone), the number of processes, its rank
    on this node (which picks the GPU) and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = CPU

    @property
    def is_main(self) -> bool:
        """True on the process that logs, writes files and downloads data."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int, least: int = 0) -> int:
    """An integer environment variable (set by `torchrun`), or `default` when unset.

    Raises:
        UserError: it is set to something other than a whole number of at least `least`.
    """
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < least:
        raise UserError(
            f"The environment variable {name}={value!r} must be a whole number of at least "
            f"{least}: unset it, or launch with torchrun, which sets RANK, WORLD_SIZE and "
            "LOCAL_RANK itself."
        )
    return number


def init_distributed(local_rank: int = -1) -> DistInfo:
    """Join the process group when launched by `torchrun`, pick the device. `local_rank` is
    `--local_rank`/`--local-rank` from the command line, or -1 to read LOCAL_RANK."""
    if local_rank < 0:
        local_rank = _env_int("LOCAL_RANK", -1)
    world_size = _env_int("WORLD_SIZE", 1, least=1)
    rank = _env_int("RANK", 0)  # read again by init_process_group, which would raise on it
    if world_size > 1 and rank >= world_size:
        raise UserError(
            f"The environment variable RANK={rank} must be below WORLD_SIZE={world_size}: "
            "launch with torchrun, which sets both."
        )
    if world_size > 1 and "MASTER_ADDR" not in os.environ:
        raise UserError(
            f"WORLD_SIZE={world_size} is set but MASTER_ADDR is not: launch distributed runs "
            "with torchrun (e.g. `torchrun --nproc_per_node 2 train.py ...`), which sets "
            "RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT."
        )
    local_rank = max(local_rank, 0)
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else CPU
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size <= 1:
        return DistInfo(0, 1, local_rank, device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    global _joined
    _joined += 1
    if dist.is_initialized():  # an outer caller's group (a sweep's run): join it
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)
    dist.init_process_group(backend=backend, init_method="env://", timeout=TIMEOUT)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)
    logger.info(
        "process group: %s backend, rank %d of %d, device %s",
        backend,
        info.rank,
        info.world_size,
        device,
    )
    return info


def barrier() -> None:
    """Wait for every process (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextmanager
def main_process_first(rank: int) -> Iterator[None]:
    """Run the block on rank 0 first (e.g. a download), then on the other ranks at once.

    Pass the local rank to run it first on every node's first process.
    """
    if rank != 0:
        barrier()
    try:
        yield
    finally:
        if rank == 0:
            barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all processes, in place; returns it (unchanged without a group)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def cleanup() -> None:
    """Leave the process group, if one was joined, once every `init_distributed` that joined it
    has called `cleanup` (a group re-created under torchrun could read the last one's stale
    rendezvous keys, so nested callers share one)."""
    global _joined
    _joined = max(_joined - 1, 0)
    if _joined == 0 and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_distributed(
    work: Callable[[DistInfo], T], verbose: bool = False, local_rank: int = -1
) -> tuple[DistInfo, T]:
    """A script's body under torchrun (or alone): join the process group, set up this rank's
    logging, run `work`, and leave the group, also when `work` fails. Returns this process's
    `DistInfo` (print only where `is_main`) and what `work` returned."""
    info = init_distributed(local_rank)
    try:
        setup_logging(verbose, info.rank, info.world_size)
        return info, work(info)
    finally:
        cleanup()


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel (`.module`) and torch.compile
    (`._orig_mod`) wrappers, however they are nested."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
