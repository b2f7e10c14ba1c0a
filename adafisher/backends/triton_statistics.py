"""Fresh statistics Ĥ and Ŝ per layer kind (docs/algorithm.md §2) on the fused kernels.

This is the seam between the optimizer's objects (modules, ``FactorBuffers``, ``LayerSlot``)
and ``adafisher.kernels``, which sees tensors and integers only. The same contract as
``adafisher.statistics`` (the reference): ``input_statistic`` returns Ĥ of one forward pass
(fp32); ``commit_pass`` adds the pass's Ĥ and Ŝ into the layer's slices of the flat pending
buffer and +1 into its pass count, so gradient accumulation is a running sum.

Launches per pass and layer: one in forward (Ĥ; BatchNorm's from the batch mean autograd
saved), one in backward (Ŝ fused with the commit), except a conv with a real patch (k > 1 or
padding, or a strided 1×1 whose positions form no single strided view): two in forward (the
batch reduction X2, then the patch sums). No zero-fills: with a ``ScratchPool`` each layer
keeps a zeroed fp32 scratch for Ĥ (and X2) that its commit zeroes again after reading.
Under ``torch.use_deterministic_algorithms(True)`` every output element has one writer that
sums in a fixed order (no float atomics racing): reproducible bit for bit, at the price of less
parallelism inside a layer (one program per channel tile); grouped convs and the norm layers'
Ĥ (a sum over channel tiles) then take the torch reference path (a few torch ops each).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .. import autograd_statistics, statistics
from ..conv_statistics import conv_geometry
from ..factors import FactorBuffers, LayerSlot
from ..kernels import conv_patch
from ..kernels.reductions import Commit, channel_reduce
from ..layers import LayerKind


def _aligned(n: int) -> int:
    """n rounded up to 4 floats: what follows Ĥ in a scratch starts 16-byte aligned."""
    return -(-n // 4) * 4


@dataclass
class _Scratch:
    storage: torch.Tensor
    busy: bool = False
    h: torch.Tensor | None = None  # the Ĥ view handed out by the current forward
    extra: torch.Tensor | None = None  # the part past Ĥ the forward used (conv X2)


class ScratchPool:
    """One zeroed fp32 scratch per layer, reused pass after pass: the forward accumulates Ĥ
    (and conv's X2) into it, the backward's commit reads it and zeroes it again on the device.
    A forward whose layer's scratch still waits for its backward (several forwards before one
    backward, or a forward never backpropagated) gets fresh zeros instead."""

    def __init__(self) -> None:
        self._layers: weakref.WeakKeyDictionary[nn.Module, _Scratch] = (
            weakref.WeakKeyDictionary())
        self.zero_fills = 0  # scratches allocated (first passes, growth, busy layers)

    def acquire(
        self, module: nn.Module, h_len: int, extra: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed ``(Ĥ, extra)`` views for this layer's forward."""
        offset = _aligned(h_len)
        entry = self._layers.get(module)
        if entry is not None and entry.busy:
            self.zero_fills += 1
            fresh = torch.zeros(offset + extra, device=device, dtype=torch.float32)
            return fresh[:h_len], fresh[offset:]
        if (entry is None or entry.storage.device != device
                or entry.storage.numel() < offset + extra):
            self.zero_fills += 1
            entry = _Scratch(torch.zeros(offset + extra, device=device, dtype=torch.float32))
            self._layers[module] = entry
        entry.busy = True
        entry.h = entry.storage[:h_len]
        entry.extra = entry.storage[offset : offset + extra]
        return entry.h, entry.extra

    def used(self, module: nn.Module, h: torch.Tensor, extra: int) -> None:
        """The forward used only ``extra`` elements past Ĥ (what the commit must zero)."""
        entry = self._layers.get(module)
        if entry is not None and entry.h is h:
            entry.extra = entry.extra[:extra]

    def release(self, module: nn.Module, h_hat: torch.Tensor) -> torch.Tensor | None:
        """The scratch past Ĥ to zero when ``h_hat`` is this layer's scratch (its commit then
        zeroes Ĥ too), else None."""
        entry = self._layers.get(module)
        if entry is None or not entry.busy or entry.h is not h_hat:
            return None
        entry.busy = False
        entry.h = None
        return entry.extra


def _deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled()


def _zeros(n: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(n, device=device, dtype=torch.float32)


def _h_storage(
    pool: ScratchPool | None, module: nn.Module, h_len: int, extra: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if pool is not None:
        return pool.acquire(module, h_len, extra, device)
    fresh = _zeros(_aligned(h_len) + extra, device)
    return fresh[:h_len], fresh[_aligned(h_len) :]


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


def conv_input_statistic(
    module: nn.modules.conv._ConvNd, x: torch.Tensor, pool: ScratchPool | None = None
) -> torch.Tensor:
    """Conv Ĥ on the kernels (any padding mode), as ``conv_statistics.conv_input_statistic``."""
    x = _conv_batched(module, x)
    has_bias = module.bias is not None
    deterministic = _deterministic()
    geometry = (tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation),
                conv_padding(module))
    if deterministic and module.groups > 1:  # stage 1 folds groups with atomics
        return statistics.input_statistic(LayerKind.CONV, module, x)
    if module.padding_mode != "zeros":
        outs = conv_patch.output_lengths(tuple(x.shape[2:]), *geometry)
        x2, _, o_sl = conv_patch.batch_squares(x, module.groups, deterministic=deterministic)
        divisor = float(x.shape[0] * math.prod(outs) * module.groups)
        return _patch_sums_torch(x2, o_sl, module.in_channels // module.groups, module,
                                 tuple(x.shape[2:]), divisor, has_bias)
    h_len, x2_len = conv_patch.conv_scratch_size(x, module.groups, module.kernel_size, has_bias)
    h, x2 = _h_storage(pool, module, h_len, x2_len, x.device)
    h, used_x2 = conv_patch.conv_input_statistic(x, module.groups, *geometry, has_bias, h, x2,
                                                 deterministic)
    if pool is not None and not used_x2:
        pool.used(module, h, 0)
    return h


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


def input_statistic(
    kind: LayerKind, module: nn.Module, x: torch.Tensor, pool: ScratchPool | None = None
) -> torch.Tensor:
    """Ĥ of one forward pass, fp32, of the layer's H length: one launch (conv: one or two)."""
    if kind is LayerKind.CONV:
        return conv_input_statistic(module, x, pool)
    deterministic = _deterministic()
    if kind is LayerKind.LINEAR:
        has_bias = module.bias is not None
        view, n_rows = _rows_as_acl(x, module.in_features)
        h, _ = _h_storage(pool, module, module.in_features + int(has_bias), 0, x.device)
        channel_reduce(view, h, n_rows, square=True, tail_one=has_bias,
                       deterministic=deterministic)
        return h
    if deterministic:  # Σ_c s_c² would gather from several programs: torch's fixed order
        return statistics.input_statistic(kind, module, x)
    # BatchNorm and LayerNorm share Ĥ's formula: per-dim-1 sums over every other dim divided
    # by (positions per sample)², then [Σ s², len(s)] / B², in one launch.
    x = _batch_first(x)
    batch, channels = x.shape[0], x.shape[1]
    positions = math.prod(x.shape[2:])
    h, _ = _h_storage(pool, module, 2, 0, x.device)
    channel_reduce(x, h, positions**2, square=False, post=2, post_divisor=batch**2,
                   second=channels)
    return h


def batchnorm_input_statistic(
    module: nn.Module, output: torch.Tensor, x: torch.Tensor, pool: ScratchPool | None = None
) -> torch.Tensor | None:
    """BatchNorm's Ĥ from the batch mean its autograd node saved (one launch over C floats),
    or None when there is none (eval mode, other kernels)."""
    if _deterministic():
        return autograd_statistics.batchnorm_input_statistic(output, x)
    saved = autograd_statistics.batchnorm_saved_mean(output, x)
    if saved is None:
        return None
    mean, count = saved
    shape = x.shape if x.dim() >= 2 else (1, *x.shape)
    batch, channels, positions = shape[0], shape[1], math.prod(shape[2:])
    h, _ = _h_storage(pool, module, 2, 0, x.device)
    # Σ_{b,t} x / T² = mean · count / T²
    channel_reduce(mean.reshape(1, channels), h, positions**2 / count, square=False, post=2,
                   post_divisor=batch**2, second=channels)
    return h


def commit_pass(
    buffers: FactorBuffers,
    slot: LayerSlot,
    module: nn.Module,
    h_hat: torch.Tensor,
    grad_output: torch.Tensor,
    batch: int,
    pool: ScratchPool | None = None,
) -> None:
    """pending[H] += Ĥ, pending[S] += Ŝ(grad_output), pass count += 1: one launch, which also
    zeroes the layer's scratch when Ĥ came from the pool."""
    extra = pool.release(module, h_hat) if pool is not None else None
    h_src = h_hat.to(device=buffers.device, dtype=torch.float32).contiguous()
    commit = Commit(
        h_src,
        buffers.pending[slot.h_offset : slot.h_offset + slot.h_len],
        buffers.pending_count[slot.index : slot.index + 1],
        clear=extra is not None and h_src is h_hat,
        scratch=extra,
    )
    s_dst = buffers.pending[slot.s_offset : slot.s_offset + slot.s_len]
    g = grad_output
    deterministic = _deterministic()
    if slot.kind is LayerKind.LINEAR:
        view, n_rows = _rows_as_acl(g, module.out_features)
        channel_reduce(view, s_dst, n_rows, square=True, commit=commit,
                       deterministic=deterministic)
    elif slot.kind is LayerKind.CONV:
        g = _conv_batched(module, g)
        channel_reduce(g, s_dst, g.numel() // g.shape[1], square=True, commit=commit,
                       deterministic=deterministic)
    else:  # (Σ g)² / B per channel, summed and squared in one launch
        if slot.kind is LayerKind.BATCHNORM:
            view = _batch_first(g)  # sum over batch and positions, per channel
        else:  # LayerNorm: sum over the leading (non-normalized) dims, per element
            view, _ = _rows_as_acl(g, math.prod(module.normalized_shape))
        channel_reduce(view, s_dst, 1.0, square=False, post=1, post_divisor=batch,
                       commit=commit)
