"""Thin ``torch.distributed`` helpers for data-parallel codebook fitting (every rank holds its own shard).

Each Lloyd / EM step reduces its sufficient statistics with one SUM all-reduce, so every rank computes the same
parameters from the same global statistics. Works with any backend that supports float64 SUM (gloo, nccl).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["resolve_distributed", "rank_and_world", "all_reduce_sum", "broadcast", "all_gather_rows"]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def resolve_distributed(distributed: bool | None) -> bool:
    """``None``: True iff a process group with more than one rank is initialised. ``True`` without one raises."""
    if distributed is None:
        return _initialized() and dist.get_world_size() > 1
    if distributed and not _initialized():
        raise RuntimeError("distributed=True but torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group(...) first, or pass distributed=False")
    return bool(distributed)


def rank_and_world(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def all_reduce_sum(t: Tensor, distributed: bool) -> Tensor:
    """In-place SUM over ranks (a no-op when not distributed)."""
    if distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast(t: Tensor, distributed: bool, src: int = 0) -> Tensor:
    """In-place broadcast of rank ``src``'s ``t`` (a no-op when not distributed)."""
    if distributed:
        dist.broadcast(t, src=src)
    return t


def all_gather_rows(row: Tensor, distributed: bool) -> Tensor:
    """(world_size, *row.shape): every rank's ``row`` (row 0 is rank 0's)."""
    if not distributed:
        return row.unsqueeze(0)
    out = [torch.empty_like(row) for _ in range(dist.get_world_size())]
    dist.all_gather(out, row.contiguous())
    return torch.stack(out)
