"""Data-parallel training: average fresh statistics across ranks (docs/algorithm.md §7).

One all-reduce per device buffer and factor update, over the flat pending sums and their pass
counts together, and none on steps that take no statistics. Summing both across ranks makes
the blended statistic the mean over every pass of every rank: for Linear and Conv layers with
equal per-rank batches that is the full-batch statistic (up to a per-layer constant, which
min-max normalization removes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .factors import FactorBuffers


def world_size() -> int:
    """Ranks to average over (1 outside an initialized process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_pending(buffers: FactorBuffers) -> None:
    """Sum pending statistics and pass counts over all ranks, in one collective. Every rank
    must call this on the same steps, whether or not its own layers ran."""
    n = buffers.pending.numel()
    flat = torch.cat([buffers.pending, buffers.pending_count])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    buffers.pending.copy_(flat[:n])
    buffers.pending_count.copy_(flat[n:])
    buffers.has_pending = True
