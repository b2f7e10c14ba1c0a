"""Conv Ĥ without im2col (docs/algorithm.md §2): one launch in the forward, one read of x.

``conv_input_partials``: each program reads a tile of channels × input positions over a part of
the batch once, keeps ``Σ_b x²`` per position in registers, and for every kernel offset k
(k₁, k₂, k₃) sums the positions k reads at some output position (``o·stride + k·dilation −
pad`` per dim, zero padding reads nothing), divided by ``B · positions_out · groups``. It
*writes* those partial Ĥ values into its own row of a scratch (no atomics, nothing to zero
first); the backward's Ŝ launch sums the rows, folding the groups, in a fixed order while it
commits the pass (``reductions._commit``). So a conv costs one launch in the forward and one
in the backward, whatever its patch, and its Ĥ is reproducible bit for bit. A 1×…×1 kernel
loads only the positions it reads (a strided 1×1 conv, NCHW or channels_last: one launch).

1-d and 2-d convs run as 3-d ones with leading unit dims. The conv is described by integers
(kernel size, stride, dilation, padding per spatial dim): this module sees tensors and integers
only. Non-zero padding modes (reflect, replicate, circular) read real positions through the
padding: the front-end runs ``batch_squares`` (``X2[c mod C/groups, l] += Σ_b x[b, c, l]²``,
one read of x) here and its own patch sums on the (small, batch-free) X2.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._launch import cdiv, gpu_like, pow2, split, target_programs, tiles
from .reductions import acl_view, sample_span


@triton.jit
def _batch_squares_kernel(
    x_ptr, out_ptr, B, C, L, s_b, s_c, s_l, per_group, o_sc, o_sl, b_per, fold,
    GROUPED: tl.constexpr, FOLD: tl.constexpr, WIDE: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # Positions on grid axis 0 (up to 2**31 − 1 programs; axes 1 and 2 stop at 65,535).
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if WIDE:  # a sample of 2**31 elements or more: 64-bit positions and offsets
        pos = tl.program_id(0).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
        c = c.to(tl.int64)
    else:
        pos = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask = (c < C)[:, None] & (pos < L)[None, :]
    b0 = tl.program_id(2) * b_per
    b1 = tl.minimum(b0 + b_per, B)
    # BLOCK_B is 1 on a GPU (walk the batch); the interpreter takes the batch in one tile.
    b_local = tl.arange(0, BLOCK_B)
    b_off = b_local.to(tl.int64)[:, None, None] * s_b
    base = x_ptr + tl.cast(b0, tl.int64) * s_b
    offsets = (c[:, None] * s_c + pos[None, :] * s_l)[None, :, :]
    acc = tl.zeros([BLOCK_B, BLOCK_C, BLOCK_L], dtype=tl.float32)
    for b_start in range(b0, b1, BLOCK_B):
        full = (b_start + b_local < b1)[:, None, None] & mask[None, :, :]
        v = tl.load(base + b_off + offsets, mask=full, other=0.0).to(tl.float32)
        acc += v * v
        base += s_b * BLOCK_B
    if GROUPED:  # fold the groups: channel c adds into c mod C/groups
        c = c % per_group
    dst = c[:, None] * o_sc + pos[None, :] * o_sl
    if FOLD:  # flat NCHW samples: element j of a sample adds into j mod (C/groups · L)
        dst = dst % fold
    tl.atomic_add(out_ptr + dst, tl.sum(acc, axis=0), mask=mask, sem="relaxed")


# The geometry integers gain nothing from Triton's value specialization (masks from integer
# arithmetic), and specializing them would compile a variant per layer shape.
_GEOMETRY = ("row", "n_k", "L2", "L3", "K2", "K3", "S1", "S2", "S3", "D1", "D2", "D3", "P1",
             "P2", "P3", "N1", "N2", "N3")


@triton.jit(do_not_specialize=_GEOMETRY)
def _patch_partials_kernel(
    x_ptr, part_ptr, B, C, L, s_b, s_c, s_l, b_per, row, n_k,
    L2, L3, K2, K3, S1, S2, S3, D1, D2, D3, P1, P2, P3, N1, N2, N3, divisor,
    POINTWISE: tl.constexpr, WIDE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    # Grid: (position tiles, channel tiles, batch parts); positions on axis 0 (up to 2**31 − 1
    # programs; axes 1 and 2 stop at 65,535).
    pid_l = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if WIDE:  # a sample of 2**31 elements or more: 64-bit positions and offsets
        pos = pid_l.to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
        c = c.to(tl.int64)
    else:
        pos = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    read = pos < L
    if POINTWISE:  # a 1×…×1 kernel reads only positions o·stride − pad: load nothing else
        t1 = pos // (L2 * L3) + P1
        t2 = (pos // L3) % L2 + P2
        t3 = pos % L3 + P3
        read = read & (t1 % S1 == 0) & (t1 < N1 * S1) & (t2 % S2 == 0) & (t2 < N2 * S2)
        read = read & (t3 % S3 == 0) & (t3 < N3 * S3)
    mask = (c < C)[:, None] & read[None, :]
    b0 = pid_b * b_per
    b1 = tl.minimum(b0 + b_per, B)
    # BLOCK_B is 1 on a GPU (walk the batch); the interpreter takes the batch in one tile.
    b_local = tl.arange(0, BLOCK_B)
    b_off = b_local.to(tl.int64)[:, None, None] * s_b
    base = x_ptr + tl.cast(b0, tl.int64) * s_b
    offsets = (c[:, None] * s_c + pos[None, :] * s_l)[None, :, :]
    acc = tl.zeros([BLOCK_B, BLOCK_C, BLOCK_L], dtype=tl.float32)
    for b_start in range(b0, b1, BLOCK_B):
        full = (b_start + b_local < b1)[:, None, None] & mask[None, :, :]
        v = tl.load(base + b_off + offsets, mask=full, other=0.0).to(tl.float32)
        acc += v * v
        base += s_b * BLOCK_B
    squares = tl.sum(acc, axis=0)  # [BLOCK_C, BLOCK_L]: this part's Σ_b x² per position
    # Per kernel offset k, the positions it reads at some output position o (per dim
    # i = o·stride + k·dilation − pad, 0 ≤ o < N): this part's Ĥ[c, k], written (no atomics,
    # nothing to zero first) into row (pid_l, pid_b) of the partials; the backward's commit
    # sums the rows (and the groups) in a fixed order. Positions past L or not read hold 0.
    # The per-dim positions are computed here, not held in registers across the batch loop.
    i1 = pos // (L2 * L3)
    i2 = (pos // L3) % L2
    i3 = pos % L3
    n_parts_b = tl.num_programs(2)
    dst = part_ptr + (pid_l.to(tl.int64) * n_parts_b + pid_b) * row + c * n_k
    c_mask = c < C
    for k in range(0, n_k):
        t1 = i1 + P1 - (k // (K2 * K3)) * D1
        t2 = i2 + P2 - ((k // K3) % K2) * D2
        t3 = i3 + P3 - (k % K3) * D3
        hit = (t1 >= 0) & (t1 % S1 == 0) & (t1 < N1 * S1) & (t2 >= 0) & (t2 % S2 == 0)
        hit = hit & (t2 < N2 * S2) & (t3 >= 0) & (t3 % S3 == 0) & (t3 < N3 * S3)
        total = tl.sum(tl.where(hit[None, :], squares, 0.0), axis=1)
        tl.store(dst + k, tl.div_rn(total, divisor), mask=c_mask)


class SquaresGeometry(NamedTuple):
    args: tuple[int, ...]  # C, L, s_b, s_c, s_l, per_group, o_sc, o_sl as the kernel reads them
    grid: tuple[int, int, int]
    b_per: int
    o_sc: int
    o_sl: int
    block_b: int
    block_c: int
    block_l: int
    grouped: bool
    fold: bool
    wide: bool


@functools.lru_cache(maxsize=4096)
def squares_geometry(
    batch: int, channels: int, length: int, s_b: int, s_c: int, s_l: int, groups: int,
    gpu: bool, programs: int, whole: bool,
) -> SquaresGeometry:
    """Stage 1's launch (cached per layer shape). ``whole``: no split of the batch (one writer
    per X2 element when there are no groups: a fixed summation order)."""
    per_group = channels // groups
    tile = 4096 if gpu else 1 << 16
    channels_last = s_c == 1 and s_l != 1
    # X2 is channel-major whatever x's layout, so the patch stage reads positions contiguously
    # (coalesced); a channels_last x is read along channels and scattered once per program.
    o_sc, o_sl = length, 1
    # A sample stored as one contiguous run of C·L elements (NCHW) is read as a flat row: full
    # tiles whatever the spatial size (7×7 included).
    nchw_run = s_l == 1 and (s_c == length or channels == 1)
    cl_run = length == 1 and s_c == 1
    if nchw_run or cl_run:
        args = (1, channels * length, s_b, 0, 1, 1, 0, 1)
        block_c, block_l = 1, pow2(channels * length, high=tile)
    elif channels_last:
        args = (channels, length, s_b, s_c, s_l, per_group, o_sc, o_sl)
        block_c = pow2(channels, high=min(128, tile))
        block_l = pow2(length, high=max(1, tile // block_c))
    else:
        args = (channels, length, s_b, s_c, s_l, per_group, o_sc, o_sl)
        block_l = pow2(length, high=min(1024, tile))
        block_c = pow2(channels, high=max(1, tile // block_l))
    block_b = 1 if gpu else pow2(batch, high=max(1, tile // (block_c * block_l)))
    l_tiles, c_tiles = tiles(args[1], block_l), tiles(args[0], block_c)
    b_per, b_parts = split(batch, 1 if whole else programs // (l_tiles * c_tiles))
    wide = sample_span(channels, length, s_c, s_l) >= 2**31 or l_tiles * block_l >= 2**31
    return SquaresGeometry(args, (l_tiles, c_tiles, b_parts), b_per, o_sc, o_sl, block_b,
                           block_c, block_l, groups > 1 and not (nchw_run or cl_run),
                           nchw_run and groups > 1, wide)


def batch_squares(
    x: torch.Tensor, groups: int, out: torch.Tensor | None = None, deterministic: bool = False
) -> tuple[torch.Tensor, int, int]:
    """Stage 1: ``(X2, o_sc, o_sl)``; X2 holds ``C/groups × L`` fp32 sums of squares, element
    (c, l) at ``c·o_sc + l·o_sl`` (laid out like x: channels innermost for channels_last).
    ``out``: zero-filled fp32 storage for X2 (default: a new one)."""
    view = acl_view(x)
    if view is None:
        x = x.contiguous()
        view = acl_view(x)
    batch, channels, length, s_b, s_c, s_l = view
    geo = squares_geometry(batch, channels, length, s_b, s_c, s_l, groups, gpu_like(x.device),
                           target_programs(x.device), deterministic)
    per_group = channels // groups
    x2 = out if out is not None else torch.zeros(per_group * length, device=x.device,
                                                 dtype=torch.float32)
    _batch_squares_kernel[geo.grid](
        x, x2, batch, *geo.args, geo.b_per, per_group * length,
        GROUPED=geo.grouped, FOLD=geo.fold, WIDE=geo.wide,
        BLOCK_B=geo.block_b, BLOCK_C=geo.block_c, BLOCK_L=geo.block_l,
    )
    return x2, geo.o_sc, geo.o_sl


def output_lengths(
    spatial: tuple[int, ...],
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    padding: tuple[tuple[int, int], ...],
) -> list[int]:
    """Output length per spatial dim; ``padding`` is ``(left, right)`` per dim."""
    outs = []
    for length, k, st, dil, (left, right) in zip(spatial, kernel_size, stride, dilation, padding):
        n_out = (length + left + right - dil * (k - 1) - 1) // st + 1
        if n_out <= 0:
            raise ValueError(f"conv output would be empty (input length {length}, kernel {k})")
        outs.append(n_out)
    return outs


def pointwise_view(
    x: torch.Tensor,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[tuple[int, int], ...],
    outs: list[int],
) -> torch.Tensor | None:
    """For a 1×…×1 conv without padding, the input positions it reads (x at o·stride, a
    strided view) when they form one (A, C, L) view; else None. Its Ĥ is then the mean of x²
    over the batch and those positions, per channel: one reduction, no patch stage."""
    if any(k != 1 for k in kernel_size) or any(p != (0, 0) for p in padding):
        return None
    index = (slice(None), slice(None)) + tuple(
        slice(0, (n - 1) * st + 1, st) for n, st in zip(outs, stride))
    view = x[index]
    return view if acl_view(view) is not None else None


class PartialsGeometry(NamedTuple):
    grid: tuple[int, int, int]  # (position tiles, channel tiles, batch parts)
    n_parts: int  # rows of partials: position tiles × batch parts
    row: int  # C_in · Πk: one partial Ĥ per input channel (groups folded by the commit)
    b_per: int
    block_b: int
    block_c: int
    block_l: int
    wide: bool
    ints: tuple[int, ...]  # L2 L3 K2 K3 S1 S2 S3 D1 D2 D3 P1 P2 P3 N1 N2 N3


@functools.lru_cache(maxsize=4096)
def partials_geometry(
    batch: int, channels: int, spatial: tuple[int, ...], s_c: int, s_l: int,
    kernel_size: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...],
    left: tuple[int, ...], outs: tuple[int, ...], gpu: bool, programs: int,
) -> PartialsGeometry:
    """The conv Ĥ launch (cached per layer shape: the first pass plans, later passes look up).

    Tiles ``channels × positions`` of one sample read coalesced (channels innermost for
    channels_last, positions innermost for NCHW); the batch is split into parts only as far as
    the partial rows (``C · Πk`` floats per part) stay under 1/16 of the elements the part
    reads."""
    length = math.prod(spatial)
    n_k = math.prod(kernel_size)
    # 2048 elements a program on a GPU (4096 took 124 registers on sm_90 for 64 × 64 tiles,
    # bench/kernel_registers.py); 1024 where a few channels_last channels make the loads
    # scalar gathers (the stem's 3 channels: 255 registers and a spill at 4096)
    tile = 2048 if gpu else 1 << 16
    if s_c == 1 and s_l != 1:  # channels_last
        block_c = pow2(channels, high=min(128, tile))
        if gpu and block_c <= 8:
            tile = 1024
        block_l = pow2(length, high=max(1, tile // block_c))
    else:
        block_l = pow2(length, high=min(1024, tile))
        block_c = pow2(channels, high=max(1, tile // block_l))
    block_b = 1 if gpu else pow2(batch, high=max(1, tile // (block_c * block_l)))
    l_tiles, c_tiles = tiles(length, block_l), tiles(channels, block_c)
    # a part writes C·Πk floats and reads b_per · C · (positions per tile) elements
    most_parts = max(1, batch // max(1, cdiv(16 * n_k, cdiv(length, l_tiles))))
    b_per, b_parts = split(batch, min(most_parts, programs // (l_tiles * c_tiles)))
    pad3 = (1,) * (3 - len(spatial))
    kernel = pad3 + kernel_size
    ints = (*(pad3 + spatial)[1:], *kernel[1:], *(pad3 + stride), *(pad3 + dilation),
            *((0,) * (3 - len(spatial)) + left), *(pad3 + outs))
    wide = sample_span(channels, length, s_c, s_l) >= 2**31 or l_tiles * block_l >= 2**31
    return PartialsGeometry((l_tiles, c_tiles, b_parts), l_tiles * b_parts, channels * n_k,
                            b_per, block_b, block_c, block_l, wide, ints)


class PartialH(NamedTuple):
    """A conv's Ĥ as the forward left it: ``n_parts`` rows of ``groups · h_core`` floats in
    ``parts``; Ĥ[j] = Σ over rows and groups of ``parts[p·row + g·h_core + j]`` (``h_core =
    C_in/groups · Πk``), then 1 for the bias. The backward's commit sums it (``total`` here
    for the other paths)."""

    parts: torch.Tensor
    n_parts: int
    groups: int
    h_core: int
    has_bias: bool

    def total(self) -> torch.Tensor:
        """Ĥ as a flat fp32 tensor (torch ops: for fallbacks and tests)."""
        rows = self.parts[: self.n_parts * self.groups * self.h_core]
        h = rows.view(self.n_parts * self.groups, self.h_core).sum(0)
        return torch.cat([h, h.new_ones(1)]) if self.has_bias else h


class PartialsLaunch(NamedTuple):
    """Everything of one conv Ĥ launch but its tensors (a layer caches it)."""

    grid: tuple[int, int, int]
    ints: tuple  # B C L s_b s_c s_l b_per row n_k L2 … N3 divisor
    constexprs: dict
    size: int  # floats of partial rows
    n_parts: int
    groups: int
    h_core: int
    has_bias: bool


def plan_partials(
    view: tuple[int, int, int, int, int, int],
    spatial: tuple[int, ...],
    device: torch.device,
    groups: int,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    padding: tuple[tuple[int, int], ...],
    has_bias: bool,
) -> PartialsLaunch:
    """The launch of ``conv_input_partials`` for an input whose ``acl_view`` is ``view``."""
    batch, channels, length, s_b, s_c, s_l = view
    outs = tuple(output_lengths(spatial, kernel_size, stride, dilation, padding))
    geo = partials_geometry(batch, channels, spatial, s_c, s_l, tuple(kernel_size),
                            tuple(stride), tuple(dilation), tuple(p[0] for p in padding), outs,
                            gpu_like(device), target_programs(device))
    n_k = math.prod(kernel_size)
    divisor = float(batch * math.prod(outs) * groups)
    return PartialsLaunch(
        geo.grid,
        (batch, channels, length, s_b, s_c, s_l, geo.b_per, geo.row, n_k, *geo.ints, divisor),
        dict(POINTWISE=all(k == 1 for k in kernel_size), WIDE=geo.wide, BLOCK_B=geo.block_b,
             BLOCK_C=geo.block_c, BLOCK_L=geo.block_l),
        geo.n_parts * geo.row, geo.n_parts, groups, channels // groups * n_k, has_bias,
    )


def launch_partials(plan: PartialsLaunch, x: torch.Tensor, parts: torch.Tensor) -> PartialH:
    """Run a planned conv Ĥ into ``parts`` (``plan.size`` floats, any contents)."""
    _patch_partials_kernel[plan.grid](x, parts, *plan.ints, **plan.constexprs)
    return PartialH(parts, plan.n_parts, plan.groups, plan.h_core, plan.has_bias)


def conv_input_partials(
    x: torch.Tensor,
    groups: int,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    padding: tuple[tuple[int, int], ...],
    has_bias: bool,
    storage: Callable[[int], torch.Tensor] | None = None,
) -> PartialH:
    """Ĥ of a zero-padded conv on a batched input x ``(B, C_in, *spatial)``, one launch, one
    read of x, no im2col and no zeroed scratch: partial sums per (position tile, batch part)
    written into ``storage(n)`` (n fp32 floats, any contents; default: new). Same values
    as ``adafisher.conv_statistics.conv_input_statistic`` once summed (``PartialH``).
    Reproducible bit for bit: every element has one writer, summed in a fixed order."""
    view = acl_view(x)
    if view is None:  # rare layouts (non-mergeable spatial strides): copy once
        x = x.contiguous()
        view = acl_view(x)
    plan = plan_partials(view, tuple(x.shape[2:]), x.device, groups, kernel_size, stride,
                         dilation, padding, has_bias)
    if storage is None:
        parts = torch.empty(plan.size, device=x.device, dtype=torch.float32)
    else:
        parts = storage(plan.size)
    return launch_partials(plan, x, parts)
