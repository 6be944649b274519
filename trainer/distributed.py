"""Data parallelism without DistributedDataParallel: ranks read disjoint shards and sum their
gradients explicitly, so steps with uneven batches (or none, at an epoch's end) stay exact.

Under `torchrun` the environment names the rank; gloo on the CPU, NCCL on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist


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


def sum_gradients(parameters: Iterable[torch.nn.Parameter], sample_count: int, ranks: Ranks) -> int:
    """Sum every rank's gradients (missing ones count as zero) and sample counts; return the
    total count. One flat all-reduce per step."""
    parameters = [parameter for parameter in parameters if parameter.requires_grad]
    if not ranks.distributed:
        return sample_count
    device = parameters[0].device
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in parameters]
        + [torch.tensor([float(sample_count)], device=device)]
    )
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for parameter in parameters:
        size = parameter.numel()
        parameter.grad = flat[offset : offset + size].view_as(parameter).to(parameter.dtype)
        offset += size
    return int(round(flat[-1].item()))


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


def gather(value: Any, ranks: Ranks) -> list[Any]:
    """Every rank's `value`, in rank order."""
    if not ranks.distributed:
        return [value]
    gathered: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(gathered, value)
    return gathered
