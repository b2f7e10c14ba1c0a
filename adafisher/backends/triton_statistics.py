"""Fresh statistics Ĥ and Ŝ per layer kind (docs/algorithm.md §2) on the fused kernels.

This is the seam between the optimizer's objects (modules, ``FactorBuffers``, ``LayerSlot``)
and ``adafisher.kernels``, which sees tensors and integers only. The same contract as
``adafisher.statistics`` (the reference): ``input_statistic`` returns Ĥ of one forward pass
(fp32); ``commit_pass`` adds the pass's Ĥ and Ŝ into the layer's slices of the flat pending
buffer and +1 into its pass count, so gradient accumulation is a running sum.
Launches per pass: Linear 1 + 1 (forward + backward), Conv 2 + 1, BatchNorm/LayerNorm 2 + 2
(plus the zero-fills of their small fp32 scratch vectors).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..conv_statistics import conv_geometry
from ..factors import FactorBuffers, LayerSlot
from ..kernels import conv_patch
from ..kernels.reductions import Commit, channel_reduce, square_commit, square_sum_pair
from ..layers import LayerKind


def _f32_zeros(n: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(n, device=device, dtype=torch.float32)


def _rows_as_acl(x: torch.Tensor, width: int) -> tuple[torch.Tensor, int]:
    """Rows ``(N, width)`` of x seen as ``(1, width, N)`` (channels = features), and N."""
    # reshape(-1, 0) is ambiguous: a zero-width Linear's rows are its leading dims
    rows = x.reshape(x.numel() // width if width else math.prod(x.shape[:-1]), width)
    return rows.t().unsqueeze(0), rows.shape[0]


def _batch_first(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() >= 2 else x.unsqueeze(0)


def _conv_batched(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == len(module.kernel_size) + 1 else x


def conv_padding(module: nn.modules.conv._ConvNd) -> tuple[tuple[int, int], ...]:
    """``(left, right)`` padding per spatial dim (``padding='same'`` resolved by torch)."""
    pads = module._reversed_padding_repeated_twice  # (last dim left, last dim right, …)
    n = len(module.kernel_size)
    return tuple((pads[2 * (n - 1 - d)], pads[2 * (n - 1 - d) + 1]) for d in range(n))


def conv_input_statistic(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """Conv Ĥ on the kernels (any padding mode), as ``conv_statistics.conv_input_statistic``."""
    x = _conv_batched(module, x)
    has_bias = module.bias is not None
    geometry = (tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation),
                conv_padding(module))
    if module.padding_mode == "zeros":
        return conv_patch.conv_input_statistic(x, module.groups, *geometry, has_bias)
    outs = conv_patch.output_lengths(tuple(x.shape[2:]), *geometry)
    x2, _, o_sl = conv_patch.batch_squares(x, module.groups)
    divisor = float(x.shape[0] * math.prod(outs) * module.groups)
    return _patch_sums_torch(x2, o_sl, module.in_channels // module.groups, module,
                             tuple(x.shape[2:]), divisor, has_bias)


def _patch_sums_torch(
    x2: torch.Tensor,
    o_sl: int,
    per_group: int,
    module: nn.modules.conv._ConvNd,
    spatial: tuple[int, ...],
    divisor: float,
    has_bias: bool,
) -> torch.Tensor:
    """Stage 2 with the reference's per-dim count matrices (non-zero padding modes)."""
    geometry = conv_geometry(module, spatial, x2.device)
    squares = x2.view(per_group, -1) if o_sl == 1 else x2.view(-1, per_group).T
    squares = squares.reshape(per_group, *spatial)
    for d, (counts, _) in enumerate(geometry):
        squares = torch.movedim(torch.movedim(squares, 1 + d, -1) @ counts.T, -1, 1 + d)
    h = squares.reshape(-1) / divisor
    return torch.cat([h, h.new_ones(1)]) if has_bias else h


def input_statistic(kind: LayerKind, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Ĥ of one forward pass, fp32, of the layer's H length."""
    if kind is LayerKind.CONV:
        return conv_input_statistic(module, x)
    if kind is LayerKind.LINEAR:
        has_bias = module.bias is not None
        view, n_rows = _rows_as_acl(x, module.in_features)
        h = _f32_zeros(module.in_features + int(has_bias), x.device)
        channel_reduce(view, h, n_rows, square=True, tail_one=has_bias)
        return h
    # BatchNorm and LayerNorm share Ĥ's formula: per-dim-1 sums over every other dim divided
    # by (positions per sample)², then [Σ s², len(s)] / B².
    x = _batch_first(x)
    batch, channels = x.shape[0], x.shape[1]
    positions = math.prod(x.shape[2:])
    sums = _f32_zeros(channels, x.device)
    channel_reduce(x, sums, positions**2, square=False)
    h = torch.empty(2, device=x.device, dtype=torch.float32)
    square_sum_pair(sums, h, batch**2, channels)
    return h


def commit_pass(
    buffers: FactorBuffers,
    slot: LayerSlot,
    module: nn.Module,
    h_hat: torch.Tensor,
    grad_output: torch.Tensor,
    batch: int,
) -> None:
    """pending[H] += Ĥ, pending[S] += Ŝ(grad_output), pass count += 1, fused with Ŝ."""
    h_src = h_hat.to(device=buffers.device, dtype=torch.float32).contiguous()
    commit = Commit(
        h_src,
        buffers.pending[slot.h_offset : slot.h_offset + slot.h_len],
        buffers.pending_count[slot.index : slot.index + 1],
    )
    s_dst = buffers.pending[slot.s_offset : slot.s_offset + slot.s_len]
    g = grad_output
    if slot.kind is LayerKind.LINEAR:
        view, n_rows = _rows_as_acl(g, module.out_features)
        channel_reduce(view, s_dst, n_rows, square=True, commit=commit)
    elif slot.kind is LayerKind.CONV:
        g = _conv_batched(module, g)
        channel_reduce(g, s_dst, g.numel() // g.shape[1], square=True, commit=commit)
    else:
        if slot.kind is LayerKind.BATCHNORM:
            view = _batch_first(g)  # sum over batch and positions, per channel
        else:  # LayerNorm: sum over the leading (non-normalized) dims, per element
            view, _ = _rows_as_acl(g, math.prod(module.normalized_shape))
        sums = _f32_zeros(slot.s_len, g.device)
        channel_reduce(view, sums, 1.0, square=False)
        square_commit(sums, s_dst, batch, commit)
