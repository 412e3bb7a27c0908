"""torch.distributed for the trainer: the world a process belongs to, read from the
environment ``torchrun`` sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``), the process group (NCCL on CUDA, gloo on CPU) and the few collectives the
training loop needs. A process started without torchrun is a world of one, and nothing
here communicates."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("tailor.workloads.training.distributed")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that reports, serves metrics, checkpoints and publishes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls) -> World:
        env = os.environ
        return cls(
            rank=int(env.get("RANK", "0")),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            size=int(env.get("WORLD_SIZE", "1")),
        )


def start(world: World, device: torch.device, timeout_s: float = 600.0) -> None:
    """Join the process group when the world has more than one process."""
    if not world.distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        rank=world.rank,
        world_size=world.size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    log.info("rank %d of %d (local %d) joined over %s", world.rank, world.size,
             world.local_rank, backend)  # fmt: skip


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """The element-wise sum of ``values`` over every rank (the values themselves alone)."""
    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return [float(v) for v in tensor.tolist()]


def all_max(value: int, device: torch.device) -> int:
    """The largest ``value`` of any rank."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
