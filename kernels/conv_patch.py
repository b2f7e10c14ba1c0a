"""Conv Ĥ without im2col (docs/algorithm.md §2), in two launches.

1. ``batch_squares``: one read of the activation. ``X2[c mod C/groups, l] += Σ_b x[b, c, l]²``
   (fp32 atomics), folding the groups as it goes; NCHW and channels_last read coalesced, and
   the scratch is ``C/groups × positions`` floats, independent of the batch size.
2. ``patch_sums``: for every patch element (c, k₁, k₂, k₃) sum X2 over the input positions that
   offset k reads at each output position (``o·stride + k·dilation − pad``, zero padding reads
   nothing), divided by ``B · positions_out · groups``; the bias entry is 1.

1-d and 2-d convs run as 3-d ones with leading unit dims. The conv is described by integers
(kernel size, stride, dilation, padding per spatial dim): this module sees tensors and integers
only. Non-zero padding modes (reflect, replicate, circular) read real positions through the
padding: the front-end runs stage 1 here and its own stage 2 on the (small, batch-free) X2.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import pow2, split, target_programs, tile_elements, tiles
from .reductions import acl_view, sample_span


@triton.jit
def _batch_squares_kernel(
    x_ptr, out_ptr, B, C, L, s_b, s_c, s_l, per_group, o_sc, o_sl, b_per, fold,
    GROUPED: tl.constexpr, FOLD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    pos = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
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
    HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_k = tl.program_id(1)
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
        v = tl.load(x2_ptr + c[:, None, None] * o_sc + pos[None, :, :] * o_sl,
                    mask=c_mask[:, None, None] & valid[None, :, :], other=0.0)
        acc += v
    total = tl.div_rn(tl.sum(acc, axis=2), divisor)
    tl.atomic_add(h_ptr + c[:, None] * n_k + k[None, :], total,
                  mask=c_mask[:, None] & k_mask[None, :], sem="relaxed")
    if HAS_BIAS:
        if (pid_c == 0) & (pid_k == 0) & (pid_o == 0):
            tl.store(h_ptr + h_len - 1, 1.0)


def batch_squares(
    x: torch.Tensor, groups: int, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, int, int]:
    """Stage 1: ``(X2, o_sc, o_sl)``; X2 holds ``C/groups × L`` fp32 sums of squares, element
    (c, l) at ``c·o_sc + l·o_sl`` (laid out like x: channels innermost for channels_last).
    ``out``: zero-filled fp32 storage for X2 (default: a new one)."""
    view = acl_view(x)
    if view is None:
        x = x.contiguous()
        view = acl_view(x)
    batch, channels, length, s_b, s_c, s_l = view
    if sample_span(channels, length, s_c, s_l) >= 2**31:
        raise ValueError("a single sample over 2**31 elements is not supported by the kernels")
    per_group = channels // groups
    x2 = out if out is not None else torch.zeros(per_group * length, device=x.device,
                                                 dtype=torch.float32)
    tile = tile_elements(x.device)
    channels_last = s_c == 1 and s_l != 1
    o_sc, o_sl = (1, per_group) if channels_last else (length, 1)  # X2 laid out like x
    # A sample stored as one contiguous run of C·L elements (NCHW; channels_last without
    # groups) is read as a flat row: full tiles whatever the spatial size (7×7 included).
    nchw_run = s_l == 1 and (s_c == length or channels == 1)
    cl_run = groups == 1 and s_c == 1 and (s_l == channels or length == 1)
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
    on_gpu = x.device.type == "cuda"
    block_b = 1 if on_gpu else pow2(batch, high=max(1, tile // (block_c * block_l)))
    grid_cl = (tiles(args[0], block_c), tiles(args[1], block_l))
    b_per, b_parts = split(batch, target_programs(x.device) // (grid_cl[0] * grid_cl[1]))
    fold = nchw_run and groups > 1
    _batch_squares_kernel[(*grid_cl, b_parts)](
        x, x2, batch, *args, b_per, per_group * length,
        GROUPED=groups > 1 and not (nchw_run or cl_run), FOLD=fold,
        BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_L=block_l,
    )
    return x2, o_sc, o_sl


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


def conv_input_statistic(
    x: torch.Tensor,
    groups: int,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    padding: tuple[tuple[int, int], ...],
    has_bias: bool,
) -> torch.Tensor:
    """Ĥ of a zero-padded conv on a batched input x ``(B, C_in, *spatial)``: flat fp32
    ``(C_in/groups · Πk [+ 1 for bias])``, as ``adafisher.conv_statistics.conv_input_statistic``."""
    batch, spatial = x.shape[0], tuple(x.shape[2:])
    per_group = x.shape[1] // groups
    outs = output_lengths(spatial, kernel_size, stride, dilation, padding)
    n_positions = math.prod(outs)
    divisor = float(batch * n_positions * groups)
    n_k = math.prod(kernel_size)
    h_len = per_group * n_k + int(has_bias)
    # One zero-fill for Ĥ and the scratch X2 (h is a view: X2's few floats per input element
    # of one sample live as long as Ĥ, until the backward pass commits it).
    scratch = torch.zeros(h_len + per_group * math.prod(spatial), device=x.device,
                          dtype=torch.float32)
    h = scratch[:h_len]
    x2, o_sc, o_sl = batch_squares(x, groups, scratch[h_len:])
    pad3 = (1,) * (3 - len(spatial))
    zero3 = (0,) * (3 - len(spatial))
    lengths = pad3 + spatial
    kernel = pad3 + tuple(kernel_size)
    stride3 = pad3 + tuple(stride)
    dilation3 = pad3 + tuple(dilation)
    left = zero3 + tuple(p[0] for p in padding)
    outs3 = pad3 + tuple(outs)
    tile = tile_elements(x.device)
    block_o = pow2(n_positions, high=min(512, tile))
    # A GPU takes one kernel offset per program; the interpreter all of them at once.
    block_k = 1 if x.device.type == "cuda" else pow2(n_k, high=max(1, tile // block_o))
    block_c = pow2(per_group, high=max(1, tile // (block_o * block_k)))
    c_tiles, k_tiles = tiles(per_group, block_c), tiles(n_k, block_k)
    o_per, o_parts = split(triton.cdiv(n_positions, block_o),
                           target_programs(x.device) // (c_tiles * k_tiles))
    _patch_sums_kernel[(c_tiles, k_tiles, o_parts)](
        x2, h, per_group, o_sc, o_sl, *lengths, *kernel[1:], *stride3, *dilation3, *left, *outs3,
        o_per * block_o, n_k, divisor, h.numel(),
        HAS_BIAS=has_bias, BLOCK_C=block_c, BLOCK_K=block_k, BLOCK_O=block_o,
    )
    return h
