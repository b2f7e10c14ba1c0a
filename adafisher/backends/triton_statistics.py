"""Fresh statistics Ĥ and Ŝ per layer kind (docs/algorithm.md §2) on the fused kernels.

This is the seam between the optimizer's objects (modules, ``FactorBuffers``, ``LayerSlot``)
and ``adafisher.kernels``, which sees tensors and integers only. The same contract as
``adafisher.statistics`` (the reference): ``input_statistic`` returns Ĥ of one forward pass
(fp32; for a conv with a patch, its partial rows, ``total`` gives Ĥ); ``commit_pass`` adds the
pass's Ĥ and Ŝ into the layer's slices of the flat pending buffer and +1 into its pass count,
so gradient accumulation is a running sum.

Launches per pass and layer, every kind: one in forward (Ĥ; BatchNorm's from the batch mean
autograd saved; a conv's partial rows) and one in backward (Ŝ fused with the commit, which sums
a conv's partial rows). No zero-fills: with a ``ScratchPool`` each layer keeps its scratch,
zeroed again by its commit where the forward accumulates. Non-zero padding modes (reflect,
replicate, circular) are the exception: one launch and a few torch ops in forward.
Under ``torch.use_deterministic_algorithms(True)`` every output element has one writer that
sums in a fixed order (no float atomics racing): reproducible bit for bit, at the price of less
parallelism inside a layer (one program per channel tile); the norm layers' Ĥ (a sum over
channel tiles) then takes the torch reference path (a few torch ops). A conv's Ĥ is
reproducible in either mode (partial rows, summed in order).
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch
from torch import nn

from .. import autograd_statistics, statistics
from ..conv_statistics import conv_geometry
from ..factors import FactorBuffers, LayerSlot
from ..kernels import conv_patch
from ..kernels.conv_patch import PartialH, PartialsLaunch, launch_partials, plan_partials
from ..kernels.reductions import (
    Commit,
    ReduceLaunch,
    acl_view,
    channel_reduce,
    launch_reduce,
    plan_reduce,
)
from ..layers import LayerKind


class _Forward(NamedTuple):
    plan: ReduceLaunch | PartialsLaunch
    n: int  # scratch floats
    zeroed: bool  # the launch accumulates (a reduction) rather than writes (partial rows)


class _Layer:
    """What the statistics path keeps per layer: its scratch, and its launches planned at its
    first pass and looked up after (forward and backward by input shape and strides; None:
    that input takes the uncached path), and its views of the pending buffer while that
    buffer stays the same tensor."""

    __slots__ = ("storage", "zeroed", "busy", "h", "forward", "backward", "views")

    def __init__(self) -> None:
        self.storage: torch.Tensor | None = None
        self.zeroed = False  # storage kept all zeros between passes (commits re-zero it)
        self.busy = False  # handed to a forward whose commit has not run yet
        self.h: torch.Tensor | None = None  # the view handed out (reused while n is the same)
        self.forward: dict[tuple, _Forward | None] = {}
        self.backward: dict[tuple, ReduceLaunch | None] = {}
        self.views: tuple[torch.Tensor, ...] | None = None


class ScratchPool:
    """Per layer (``_Layer``): one fp32 scratch, reused pass after pass so that a steady pass
    allocates and fills nothing, and the layer's planned launches. ``zeroed`` scratch (Ĥ that
    a forward accumulates into with atomics) is zeroed again on the device by the backward's
    commit after reading it; a conv's partial rows are written whole by the forward and need
    no zeroing. A forward whose layer's scratch still waits for its backward (several forwards
    before one backward, or a forward never backpropagated) gets new storage instead."""

    def __init__(self) -> None:
        # by id(module), dropped when the module is collected (a plain dict: one lookup, no
        # weak reference made per call)
        self._layers: dict[int, _Layer] = {}
        self.zero_fills = 0  # zeroed scratches allocated (first passes, growth, busy layers)

    def layer(self, module: nn.Module) -> _Layer:
        state = self._layers.get(id(module))
        if state is None:
            state = self._layers[id(module)] = _Layer()
            weakref.finalize(module, self._layers.pop, id(module), None)
        return state

    def acquire(
        self, module: nn.Module, n: int, device: torch.device, zeroed: bool = True,
        state: _Layer | None = None,
    ) -> torch.Tensor:
        """``n`` fp32 floats for this layer's forward (all zeros when ``zeroed``), 16-byte
        aligned (its own allocation)."""
        if state is None:
            state = self.layer(module)
        if state.busy:
            return self._new(n, device, zeroed)
        storage = state.storage
        if (storage is None or state.zeroed != zeroed or storage.device != device
                or storage.numel() < n):
            storage = state.storage = self._new(n, device, zeroed)
            state.zeroed, state.h = zeroed, None
        state.busy = True
        if state.h is None or state.h.numel() != n:
            state.h = storage[:n]
        return state.h

    def _new(self, n: int, device: torch.device, zeroed: bool) -> torch.Tensor:
        if zeroed:
            self.zero_fills += 1
            return torch.zeros(n, device=device, dtype=torch.float32)
        return torch.empty(n, device=device, dtype=torch.float32)

    def release(self, module: nn.Module, h_src: torch.Tensor) -> bool:
        """Whether ``h_src`` (what the forward wrote) is this layer's pooled scratch, which is
        then free for the next forward (a zeroed one once the commit has zeroed it)."""
        state = self._layers.get(id(module))
        if state is None or not state.busy or state.h is not h_src:
            return False
        state.busy = False
        return True


def _deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled()


def _h_storage(
    pool: ScratchPool | None, module: nn.Module, h_len: int, device: torch.device
) -> torch.Tensor:
    if pool is not None:
        return pool.acquire(module, h_len, device)
    return torch.zeros(h_len, device=device, dtype=torch.float32)


def total(h_hat: torch.Tensor | PartialH) -> torch.Tensor:
    """Ĥ as a flat fp32 tensor, from what ``input_statistic`` returned (torch ops for a conv's
    partial rows: fallbacks and tests; the commit sums them in its own launch)."""
    return h_hat.total() if isinstance(h_hat, PartialH) else h_hat


def settle(h_hat: torch.Tensor | PartialH, module: nn.Module,
           pool: ScratchPool | None) -> torch.Tensor:
    """Ĥ for a commit outside the kernels (torch fallback): a conv's partial rows summed, their
    pooled storage free again. A pooled zeroed Ĥ stays taken (nothing zeroes it): the layer's
    next forward gets new zeros."""
    if isinstance(h_hat, PartialH):
        if pool is not None:
            pool.release(module, h_hat.parts)
        return h_hat.total()
    return h_hat


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
) -> torch.Tensor | PartialH:
    """Conv Ĥ on the kernels (any padding mode), as ``conv_statistics.conv_input_statistic``
    once ``total``-ed: one launch for zero padding (partial rows the commit sums, or for a
    1×1 conv whose positions form one strided view, Ĥ itself)."""
    x = _conv_batched(module, x)
    has_bias = module.bias is not None
    geometry = (tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation),
                conv_padding(module))
    if module.padding_mode != "zeros":
        outs = conv_patch.output_lengths(tuple(x.shape[2:]), *geometry)
        x2, _, o_sl = conv_patch.batch_squares(x, module.groups, deterministic=_deterministic())
        divisor = float(x.shape[0] * math.prod(outs) * module.groups)
        return _patch_sums_torch(x2, o_sl, module.in_channels // module.groups, module,
                                 tuple(x.shape[2:]), divisor, has_bias)
    if module.groups == 1:
        outs = conv_patch.output_lengths(tuple(x.shape[2:]), *geometry)
        pointwise = conv_patch.pointwise_view(x, geometry[0], geometry[1], geometry[3], outs)
        if pointwise is not None:  # Ĥ[c] = mean of x² over the batch and the read positions
            h = _h_storage(pool, module, x.shape[1] + int(has_bias), x.device)
            channel_reduce(pointwise, h, float(x.shape[0] * math.prod(outs)), square=True,
                           tail_one=has_bias, deterministic=_deterministic())
            return h
    storage = None
    if pool is not None:
        def storage(n: int) -> torch.Tensor:
            return pool.acquire(module, n, x.device, zeroed=False)
    return conv_patch.conv_input_partials(x, module.groups, *geometry, has_bias, storage)


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


def _plan_forward(
    kind: LayerKind, module: nn.Module, x: torch.Tensor, deterministic: bool
) -> _Forward | None:
    """The layer's forward launch for inputs shaped and strided like x, reading x itself from
    its first element (what ``input_statistic`` launches, minus its views), or None when such
    an input needs a copy first or takes the torch path."""
    if kind is LayerKind.LINEAR:
        width, has_bias = module.in_features, module.bias is not None
        if width == 0 or x.dim() == 0:
            return None
        try:
            rows = x.view(-1, width)
        except RuntimeError:  # not viewable as rows: reshape copies
            return None
        plan = plan_reduce(acl_view(rows.t().unsqueeze(0)), x.device, rows.shape[0],
                           square=True, tail_one=has_bias, deterministic=deterministic)
        return _Forward(plan, width + int(has_bias), True)
    if kind is LayerKind.CONV:
        if module.padding_mode != "zeros":
            return None
        x = _conv_batched(module, x)
        has_bias = module.bias is not None
        geometry = (tuple(module.kernel_size), tuple(module.stride), tuple(module.dilation),
                    conv_padding(module))
        outs = conv_patch.output_lengths(tuple(x.shape[2:]), *geometry)
        if module.groups == 1:
            pointwise = conv_patch.pointwise_view(x, geometry[0], geometry[1], geometry[3], outs)
            if pointwise is not None:  # a view from x's first element
                plan = plan_reduce(acl_view(pointwise), x.device,
                                   float(x.shape[0] * math.prod(outs)), square=True,
                                   tail_one=has_bias, deterministic=deterministic)
                return _Forward(plan, x.shape[1] + int(has_bias), True)
        view = acl_view(x)
        if view is None:
            return None
        plan = plan_partials(view, tuple(x.shape[2:]), x.device, module.groups, *geometry,
                             has_bias)
        return _Forward(plan, plan.size, False)
    if deterministic:
        return None
    x = _batch_first(x)
    view = acl_view(x)
    if view is None:
        return None
    plan = plan_reduce(view, x.device, math.prod(x.shape[2:]) ** 2, square=False, post=2,
                       post_divisor=x.shape[0] ** 2, second=x.shape[1])
    return _Forward(plan, 2, True)


def _run_forward(
    forward: _Forward, module: nn.Module, x: torch.Tensor, pool: ScratchPool, state: _Layer
) -> torch.Tensor | PartialH:
    out = pool.acquire(module, forward.n, x.device, forward.zeroed, state)
    if forward.zeroed:
        launch_reduce(forward.plan, x, out)
        return out
    return launch_partials(forward.plan, x, out)


def input_statistic(
    kind: LayerKind, module: nn.Module, x: torch.Tensor, pool: ScratchPool | None = None
) -> torch.Tensor | PartialH:
    """Ĥ of one forward pass, fp32, of the layer's H length (a conv's as partial rows): one
    launch. With a pool, planned at the layer's first pass for each input shape and layout."""
    if pool is not None:
        deterministic = _deterministic()
        state = pool.layer(module)
        forwards = state.forward
        key = (x.shape, x.stride(), x.device, deterministic)
        try:
            forward = forwards[key]
        except KeyError:
            forward = forwards[key] = _plan_forward(kind, module, x, deterministic)
        if forward is not None:
            return _run_forward(forward, module, x, pool, state)
    if kind is LayerKind.CONV:
        return conv_input_statistic(module, x, pool)
    deterministic = _deterministic()
    if kind is LayerKind.LINEAR:
        has_bias = module.bias is not None
        view, n_rows = _rows_as_acl(x, module.in_features)
        h = _h_storage(pool, module, module.in_features + int(has_bias), x.device)
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
    h = _h_storage(pool, module, 2, x.device)
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
    if pool is not None:
        state = pool.layer(module)
        forwards = state.forward
        key = ("mean", mean.shape, mean.stride(), x.shape, x.device)
        forward = forwards.get(key)
        if forward is None:
            forward = forwards[key] = _Forward(_plan_mean(mean, x, count), 2, True)
        return _run_forward(forward, module, mean, pool, state)
    h = _h_storage(pool, module, 2, x.device)
    launch_reduce(_plan_mean(mean, x, count), mean, h)
    return h


def _plan_mean(mean: torch.Tensor, x: torch.Tensor, count: int) -> ReduceLaunch:
    shape = x.shape if x.dim() >= 2 else (1, *x.shape)
    batch, channels, positions = shape[0], shape[1], math.prod(shape[2:])
    # Σ_{b,t} x / T² = mean · count / T²
    return plan_reduce(acl_view(mean.view(1, channels)), x.device, positions**2 / count,
                       square=False, post=2, post_divisor=batch**2, second=channels)


def _commit_of(
    h_hat: torch.Tensor | PartialH, module: nn.Module, h_dst: torch.Tensor,
    count: torch.Tensor, pool: ScratchPool | None,
) -> Commit:
    if isinstance(h_hat, PartialH):
        if pool is not None:
            pool.release(module, h_hat.parts)
        return Commit(h_hat.parts, h_dst, count, h_len=h_hat.h_core, parts=h_hat.n_parts,
                      part_stride=h_hat.groups * h_hat.h_core, groups=h_hat.groups,
                      tail=h_hat.has_bias)
    pooled = pool is not None and pool.release(module, h_hat)
    h_src = h_hat.to(device=h_dst.device, dtype=torch.float32).contiguous()
    return Commit(h_src, h_dst, count, clear=pooled and h_src is h_hat)


def _plan_backward(
    kind: LayerKind, module: nn.Module, g: torch.Tensor, commit: Commit, batch: int,
    deterministic: bool,
) -> ReduceLaunch | None:
    """The layer's backward launch (Ŝ with the commit fused) for output gradients shaped and
    strided like g, reading g from its first element; None when g needs a copy first."""
    if kind is LayerKind.LINEAR or kind is LayerKind.LAYERNORM:
        width = (module.out_features if kind is LayerKind.LINEAR
                 else math.prod(module.normalized_shape))
        if width == 0 or g.dim() == 0:
            return None
        try:
            rows = g.view(-1, width)
        except RuntimeError:
            return None
        view = acl_view(rows.t().unsqueeze(0))
        if kind is LayerKind.LINEAR:
            return plan_reduce(view, g.device, rows.shape[0], square=True, commit=commit,
                               deterministic=deterministic)
        return plan_reduce(view, g.device, 1.0, square=False, post=1, post_divisor=batch,
                           commit=commit)
    g = _conv_batched(module, g) if kind is LayerKind.CONV else _batch_first(g)
    view = acl_view(g)
    if view is None:
        return None
    if kind is LayerKind.CONV:
        return plan_reduce(view, g.device, g.numel() // g.shape[1], square=True, commit=commit,
                           deterministic=deterministic)
    return plan_reduce(view, g.device, 1.0, square=False, post=1, post_divisor=batch,
                       commit=commit)


def commit_pass(
    buffers: FactorBuffers,
    slot: LayerSlot,
    module: nn.Module,
    h_hat: torch.Tensor | PartialH,
    grad_output: torch.Tensor,
    batch: int,
    pool: ScratchPool | None = None,
) -> None:
    """pending[H] += Ĥ, pending[S] += Ŝ(grad_output), pass count += 1: one launch, which also
    sums a conv's partial rows, or zeroes the layer's pooled Ĥ after reading it. With a pool,
    planned at the layer's first pass for each gradient shape and layout."""
    if pool is not None:
        plans = pool.layer(module)
        views = plans.views
        if views is None or views[0] is not buffers.pending or (
                views[1] is not buffers.pending_count):
            views = plans.views = (
                buffers.pending, buffers.pending_count,
                buffers.pending[slot.h_offset : slot.h_offset + slot.h_len],
                buffers.pending_count[slot.index : slot.index + 1],
                buffers.pending[slot.s_offset : slot.s_offset + slot.s_len])
        _, _, h_dst, count, s_dst = views
        commit = _commit_of(h_hat, module, h_dst, count, pool)
        deterministic = _deterministic()
        key = (grad_output.shape, grad_output.stride(), grad_output.device, deterministic,
               batch, commit.h_len, commit.parts, commit.groups, commit.clear, commit.tail)
        try:
            plan = plans.backward[key]
        except KeyError:
            plan = plans.backward[key] = _plan_backward(slot.kind, module, grad_output, commit,
                                                        batch, deterministic)
        if plan is not None:
            launch_reduce(plan, grad_output, s_dst, commit.h_src, h_dst, count)
            return
    else:
        h_dst = buffers.pending[slot.h_offset : slot.h_offset + slot.h_len]
        count = buffers.pending_count[slot.index : slot.index + 1]
        s_dst = buffers.pending[slot.s_offset : slot.s_offset + slot.s_len]
        commit = _commit_of(h_hat, module, h_dst, count, pool)
    _commit_uncached(slot, module, commit, s_dst, grad_output, batch)


def _commit_uncached(
    slot: LayerSlot, module: nn.Module, commit: Commit, s_dst: torch.Tensor,
    g: torch.Tensor, batch: int,
) -> None:
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
