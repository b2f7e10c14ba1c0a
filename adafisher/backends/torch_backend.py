"""The pure-PyTorch backend: runs everywhere, and is the reference for the fused kernels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import autograd_statistics, statistics
from ..factors import FactorBuffers, LayerSlot
from ..functional import adafisher_update, preconditioner
from ..layers import LayerKind
from .base import GroupStep

# Added to max − min in min-max normalization (docs/algorithm.md §3).
NORMALIZATION_EPS = 1e-6


def update_factors(buffers: FactorBuffers, gammas: Sequence[float]) -> None:
    """Normalize and blend every layer's pending statistics in a few whole-buffer ops."""
    gamma_keep, gamma_new = 1.0 - gammas[0], gammas[1]
    segments = buffers.segment_ids
    n_segments = buffers.blended.numel()
    count = buffers.pending_count.repeat_interleave(2)  # per segment
    active = count > 0
    fresh = buffers.pending / count.clamp_min(1.0)[segments]
    finite = torch.isfinite(fresh)
    # Every allocation names its dtype: the result must not follow torch's default dtype.
    bad = torch.zeros(n_segments, device=fresh.device, dtype=torch.int32).index_add_(
        0, segments, (~finite).to(torch.int32)
    ) > 0
    clean = torch.where(finite, fresh, 0.0)
    low = torch.full((n_segments,), torch.inf, device=fresh.device, dtype=fresh.dtype)
    low = low.scatter_reduce(0, segments, clean, "amin")
    high = torch.full((n_segments,), -torch.inf, device=fresh.device, dtype=fresh.dtype)
    high = high.scatter_reduce(0, segments, clean, "amax")
    normalized = (clean - low[segments]) / (high - low + NORMALIZATION_EPS)[segments]
    blend = active & ~bad
    blended_value = buffers.factors * gamma_keep + normalized * gamma_new
    buffers.factors.copy_(torch.where(blend[segments], blended_value, buffers.factors))
    buffers.nonfinite.add_(active & bad)
    buffers.blended.logical_or_(blend)
    buffers.pending.zero_()
    buffers.pending_count.zero_()
    buffers.has_pending = False


class TorchBackend:
    name = "torch"

    def input_statistic(self, kind: LayerKind, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return statistics.input_statistic(kind, module, x)

    def batchnorm_input_statistic(
        self, module: nn.Module, output: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor | None:
        return autograd_statistics.batchnorm_input_statistic(output, x)

    def hook_commit(self, buffers: FactorBuffers, slot: LayerSlot, module: nn.Module,
                    x: torch.Tensor, output: torch.Tensor, batch: int,
                    param: torch.Tensor | None, from_norm_node: bool) -> bool:
        return False  # the Python hooks commit (commit_pass)

    def commit_pass(
        self,
        buffers: FactorBuffers,
        slot: LayerSlot,
        module: nn.Module,
        h_hat: torch.Tensor,
        grad_output: torch.Tensor,
        batch: int,
    ) -> None:
        s_hat = statistics.output_statistic(slot.kind, module, grad_output, batch)
        buffers.pending[slot.h_offset : slot.h_offset + slot.h_len].add_(h_hat)
        buffers.pending[slot.s_offset : slot.s_offset + slot.s_len].add_(s_hat)
        buffers.pending_count[slot.index : slot.index + 1].add_(1.0)  # in place, no copy-back

    def update_factors(self, buffers: FactorBuffers, gammas: Sequence[float]) -> None:
        update_factors(buffers, gammas)

    def step(self, group: GroupStep) -> None:
        # One host read of the "has factors" flags per buffer and step; CPU is this backend's
        # home, where it costs nothing.
        initialized: dict[int, list[bool]] = {}
        for i, param in enumerate(group.params):
            index, buffers = group.indices[i], group.buffers[i]
            fisher = None
            if index is not None:
                flags = initialized.get(id(buffers))
                if flags is None:
                    flags = initialized[id(buffers)] = buffers.initialized().tolist()
                if flags[index.layer]:
                    f = buffers.factors
                    fisher = preconditioner(
                        f[index.s_offset : index.s_offset + index.rows],
                        f[index.h_offset : index.h_offset + index.cols],
                        group.damping,
                        param.shape,
                    )
            adafisher_update(
                param,
                group.grads[i],
                group.exp_avgs[i],
                group.steps[i],
                fisher,
                lr=group.lr,
                beta=group.beta,
                weight_decay=group.weight_decay,
                decoupled=group.decoupled,
                maximize=group.maximize,
            )
