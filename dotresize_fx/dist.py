"""Data-parallel calibration on torch.distributed (DESIGN §9b): ranks split the calibration batches, sum their
statistics (Grams, cross-Grams, counts) with all-reduce — or, while there are fewer rows than channels, gather
the rows themselves, so the fits stay in the row space — and so compute the same maps; rank 0 evaluates and
writes. Started by torchrun (`torchrun --nproc-per-node N -m dotresize_fx.cli compress …`): gloo on CPU,
NCCL when the ranks have GPUs. Without torchrun everything here is a no-op.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .errors import DotResizeError


def init_from_env() -> None:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR, …), once."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def shard(batches: list) -> list:
    """This rank's share of the calibration batches (every world_size-th, from its rank)."""
    n = world_size()
    if n == 1:
        return batches
    if len(batches) < n:
        raise DotResizeError(f"{len(batches)} calibration batches for {n} ranks: raise --calib-samples or start "
                             "fewer processes")
    return batches[dist.get_rank()::n]


def sum_(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the ranks, in place (float64 statistics stay float64)."""
    if world_size() == 1:
        return
    for t in tensors:
        if t is not None:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def sum_count(count: int) -> int:
    if world_size() == 1:
        return count
    t = torch.tensor([count], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def gather(obj) -> list:
    """Every rank's `obj`, in rank order (a one-element list in one process)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
