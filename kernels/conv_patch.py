"""Conv Ĥ without im2col (docs/algorithm.md §2): two launches, one for a 1×1 conv without padding.

1. ``batch_squares``: one read of the activation. ``X2[c mod C/groups, l] += Σ_b x[b, c, l]²``
   (fp32 atomics), folding the groups as it goes; NCHW and channels_last read coalesced, and
   the scratch is ``C/groups × positions`` floats (channel-major), independent of the batch.
2. ``patch_sums``: for every patch element (c, k₁, k₂, k₃) sum X2 over the input positions that
   offset k reads at each output position (``o·stride + k·dilation − pad``, zero padding reads
   nothing), divided by ``B · positions_out · groups``; the bias entry is 1.

1-d and 2-d convs run as 3-d ones with leading unit dims. The conv is described by integers
(kernel size, stride, dilation, padding per spatial dim): this module sees tensors and integers
only. Non-zero padding modes (reflect, replicate, circular) read real positions through the
padding: the front-end runs stage 1 here and its own stage 2 on the (small, batch-free) X2.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._launch import gpu_like, pow2, split, target_programs, tiles
from .reductions import acl_view, channel_reduce, sample_span


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


# The geometry integers gain nothing from Triton's value specialization (the gathers are
# irregular), and specializing them would compile a variant per layer shape.
_GEOMETRY = ("per_group", "o_sc", "o_sl", "L1", "L2", "L3", "K2", "K3", "S1", "S2", "S3",
             "D1", "D2", "D3", "P1", "P2", "P3", "N1", "N2", "N3", "o_per", "n_k", "h_len")


@triton.jit(do_not_specialize=_GEOMETRY)
def _patch_sums_kernel(
    x2_ptr, h_ptr, per_group, o_sc, o_sl,
    L1, L2, L3, K2, K3, S1, S2, S3, D1, D2, D3, P1, P2, P3, N1, N2, N3,
    o_per, n_k, divisor, h_len,
    HAS_BIAS: tl.constexpr, WIDE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    # (channel tile, kernel offset tile) flattened on grid axis 0: no axis past 65,535
    k_tiles = tl.cdiv(n_k, BLOCK_K)
    pid_c = tl.program_id(0) // k_tiles
    pid_k = tl.program_id(0) % k_tiles
    pid_o = tl.program_id(2)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = k < n_k
    k1 = (k // (K2 * K3))[:, None]
    k2 = ((k // K3) % K2)[:, None]
    k3 = (k % K3)[:, None]
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < per_group
    n_out = N1 * N2 * N3
    o_lo = pid_o * o_per
    o_hi = tl.minimum(o_lo + o_per, n_out)
    acc = tl.zeros([BLOCK_C, BLOCK_K, BLOCK_O], dtype=tl.float32)
    for start in range(o_lo, o_hi, BLOCK_O):
        o = start + tl.arange(0, BLOCK_O)
        # input position read by offset k at output position o, per dim: [BLOCK_K, BLOCK_O]
        i1 = ((o // (N2 * N3)) * S1)[None, :] + k1 * D1 - P1
        i2 = (((o // N3) % N2) * S2)[None, :] + k2 * D2 - P2
        i3 = ((o % N3) * S3)[None, :] + k3 * D3 - P3
        valid = (o < o_hi)[None, :] & k_mask[:, None] & (i1 >= 0) & (i1 < L1)
        valid = valid & (i2 >= 0) & (i2 < L2) & (i3 >= 0) & (i3 < L3)
        pos = (i1 * L2 + i2) * L3 + i3
        if WIDE:  # X2 of 2**31 elements or more
            pos = (i1.to(tl.int64) * L2 + i2) * L3 + i3
        v = tl.load(x2_ptr + c[:, None, None] * o_sc + pos[None, :, :] * o_sl,
                    mask=c_mask[:, None, None] & valid[None, :, :], other=0.0)
        acc += v
    total = tl.div_rn(tl.sum(acc, axis=2), divisor)
    tl.atomic_add(h_ptr + c[:, None] * n_k + k[None, :], total,
                  mask=c_mask[:, None] & k_mask[None, :], sem="relaxed")
    if HAS_BIAS:
        if (pid_c == 0) & (pid_k == 0) & (pid_o == 0):
            tl.store(h_ptr + h_len - 1, 1.0)


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


def conv_scratch_size(
    x: torch.Tensor, groups: int, kernel_size: tuple[int, ...], has_bias: bool
) -> tuple[int, int]:
    """``(h_len, X2 length)`` of a zero-padded conv's Ĥ and stage-1 scratch for input x."""
    per_group = x.shape[1] // groups
    return per_group * math.prod(kernel_size) + int(has_bias), per_group * math.prod(x.shape[2:])


def conv_input_statistic(
    x: torch.Tensor,
    groups: int,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    padding: tuple[tuple[int, int], ...],
    has_bias: bool,
    h: torch.Tensor | None = None,
    x2: torch.Tensor | None = None,
    deterministic: bool = False,
) -> tuple[torch.Tensor, bool]:
    """Ĥ of a zero-padded conv on a batched input x ``(B, C_in, *spatial)``: flat fp32
    ``(C_in/groups · Πk [+ 1 for bias])``, as ``adafisher.conv_statistics.conv_input_statistic``,
    and whether X2 was used. ``h`` / ``x2``: zero-filled fp32 storage (``conv_scratch_size``)
    to accumulate into (default: new zeros). ``deterministic``: a fixed summation order
    (grouped convs are not covered: the caller takes another path)."""
    batch, spatial = x.shape[0], tuple(x.shape[2:])
    per_group = x.shape[1] // groups
    outs = output_lengths(spatial, kernel_size, stride, dilation, padding)
    n_positions = math.prod(outs)
    divisor = float(batch * n_positions * groups)
    h_len, x2_len = conv_scratch_size(x, groups, kernel_size, has_bias)
    if h is None:
        h = torch.zeros(h_len, device=x.device, dtype=torch.float32)
    if groups == 1:
        pointwise = pointwise_view(x, kernel_size, stride, padding, outs)
        if pointwise is not None:
            channel_reduce(pointwise, h, divisor, square=True, tail_one=has_bias,
                           deterministic=deterministic)
            return h, False
    if x2 is None:
        x2 = torch.zeros(x2_len, device=x.device, dtype=torch.float32)
    x2, o_sc, o_sl = batch_squares(x, groups, x2, deterministic)
    geo = patch_geometry(per_group, spatial, tuple(kernel_size), tuple(stride), tuple(dilation),
                         tuple(p[0] for p in padding), tuple(outs), gpu_like(x.device),
                         target_programs(x.device), deterministic)
    _patch_sums_kernel[geo.grid](
        x2, h, per_group, o_sc, o_sl, *geo.ints, geo.o_per, geo.n_k, divisor, h_len,
        HAS_BIAS=has_bias, WIDE=x2_len >= 2**31, BLOCK_C=geo.block_c, BLOCK_K=geo.block_k,
        BLOCK_O=geo.block_o,
    )
    return h, True


class PatchGeometry(NamedTuple):
    ints: tuple[int, ...]  # L1 L2 L3 K2 K3 S1 S2 S3 D1 D2 D3 P1 P2 P3 N1 N2 N3
    grid: tuple[int, int, int]
    o_per: int
    n_k: int
    block_c: int
    block_k: int
    block_o: int


@functools.lru_cache(maxsize=4096)
def patch_geometry(
    per_group: int, spatial: tuple[int, ...], kernel_size: tuple[int, ...],
    stride: tuple[int, ...], dilation: tuple[int, ...], left: tuple[int, ...],
    outs: tuple[int, ...], gpu: bool, programs: int, whole: bool,
) -> PatchGeometry:
    """Stage 2's launch (cached per layer shape); ``whole``: no split of the output positions."""
    pad3 = (1,) * (3 - len(spatial))
    zero3 = (0,) * (3 - len(spatial))
    kernel = pad3 + kernel_size
    ints = (*(pad3 + spatial), *kernel[1:], *(pad3 + stride), *(pad3 + dilation),
            *(zero3 + left), *(pad3 + outs))
    n_positions, n_k = math.prod(outs), math.prod(kernel_size)
    # 2048 elements a program on a GPU: 4096 took 155 registers on sm_90 for 64 × 64 tiles
    # (bench/kernel_registers.py), past the 128 that keep occupancy.
    tile = 2048 if gpu else 1 << 16
    block_o = pow2(n_positions, high=min(512, tile))
    # A GPU takes one kernel offset per program; the interpreter all of them at once.
    block_k = 1 if gpu else pow2(n_k, high=max(1, tile // block_o))
    block_c = pow2(per_group, high=max(1, tile // (block_o * block_k)))
    c_tiles, k_tiles = tiles(per_group, block_c), tiles(n_k, block_k)
    o_per, o_parts = split(triton.cdiv(n_positions, block_o),
                           1 if whole else programs // (c_tiles * k_tiles))
    return PatchGeometry(ints, (c_tiles * k_tiles, 1, o_parts), o_per * block_o, n_k, block_c,
                         block_k, block_o)
