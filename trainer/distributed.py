"""Data parallelism with DistributedDataParallel: ranks read disjoint shards, DDP averages their
gradients, and the loop weights them so a step's gradient is the mean over every rank's samples
of that step, however uneven (see `trainer.loop.Trainer._step`).

Under `torchrun` the environment names the rank; gloo on the CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device_type: str) -> Ranks:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    ranks = Ranks(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if ranks.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return ranks


def teardown(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.barrier()  # no rank tears down while another still talks to it
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, ranks: Ranks, device: torch.device) -> DistributedDataParallel | None:
    """`model` in DistributedDataParallel when there are several ranks, else None. Gradient
    averaging then rides on DDP's bucketed all-reduce, overlapped with the backward pass."""
    if not ranks.distributed:
        return None
    device_ids = [device.index if device.index is not None else ranks.local_rank] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def global_count(sample_count: int, ranks: Ranks, device: torch.device) -> torch.Tensor:
    """Samples of this step on every rank together, as a float tensor on `device` (no host
    sync: NCCL queues the all-reduce on the device's stream)."""
    count = torch.tensor(float(sample_count), device=device)
    if ranks.distributed:
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
    return count


def any_rank(flag: bool, ranks: Ranks, device: torch.device) -> bool:
    """True when `flag` is true on some rank (every rank must call this together)."""
    if not ranks.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def sum_values(values: list[float], ranks: Ranks, device: torch.device) -> list[float]:
    """Element-wise sum over ranks (for metrics)."""
    if not ranks.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def sum_tensor(tensor: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The tensor summed over ranks (a confusion matrix, for metrics)."""
    if not ranks.distributed:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def gather(value: Any, ranks: Ranks) -> list[Any]:
    """Every rank's `value`, in rank order."""
    if not ranks.distributed:
        return [value]
    gathered: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(gathered, value)
    return gathered
