"""Per-channel reductions behind every statistic except the conv Ĥ (docs/algorithm.md §2).

One kernel reads a tensor viewed as ``(A, C, L)`` (any strides) once and adds, per channel c,
``Σ_{a,l} f(x[a, c, l]) / divisor`` into ``out[c]`` (fp32, atomics), with ``f`` = square or
identity. Viewed that way it covers:

- Linear Ĥ / Ŝ: rows ``(N, D)`` as ``A = 1, C = D, L = N``: ``mean_rows(x²)``;
- Conv Ŝ: ``(B, C, positions)``: mean of g² per output channel (NCHW or channels_last);
- BatchNorm / LayerNorm: plain per-channel sums, finished by two tiny single-program kernels.

Committing a backward pass (adding the forward's Ĥ into the pending buffer and +1 into the
layer's pass count) rides along in program 0 of the Ŝ launch, so a Linear or Conv pass costs one
launch on the backward side.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import pow2, split, target_programs, tile_elements, tiles


@triton.jit
def _channel_reduce_kernel(
    x_ptr, out_ptr, A, C, L, s_a, s_c, s_l, a_per, l_per, divisor,
    h_src, h_dst, h_len, count_ptr,
    SQUARE: tl.constexpr, TAIL_ONE: tl.constexpr, COMMIT: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_a = tl.program_id(1)
    pid_l = tl.program_id(2)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    a0 = pid_a * a_per
    a1 = tl.minimum(a0 + a_per, A)
    l0 = pid_l * l_per
    l1 = tl.minimum(l0 + l_per, L)
    # Samples step by a 64-bit base (an activation may exceed 2**31 elements); offsets inside
    # one sample are 32-bit unless WIDE (a Linear's N × D rows form one "sample").
    # BLOCK_A is 1 on a GPU; the interpreter takes all samples in one tile.
    a_local = tl.arange(0, BLOCK_A)
    a_off = a_local.to(tl.int64)[:, None, None] * s_a
    base = x_ptr + tl.cast(a0, tl.int64) * s_a
    acc = tl.zeros([BLOCK_A, BLOCK_C, BLOCK_L], dtype=tl.float32)
    for a_start in range(a0, a1, BLOCK_A):
        a_mask = (a_start + a_local < a1)[:, None, None] & c_mask[None, :, None]
        for l_start in range(l0, l1, BLOCK_L):
            pos = l_start + tl.arange(0, BLOCK_L)
            mask = a_mask & (pos < l1)[None, None, :]
            if WIDE:
                offsets = c[:, None].to(tl.int64) * s_c + pos[None, :].to(tl.int64) * s_l
            else:
                offsets = c[:, None] * s_c + pos[None, :] * s_l
            v = tl.load(base + a_off + offsets[None, :, :], mask=mask, other=0.0)
            v = v.to(tl.float32)
            if SQUARE:
                acc += v * v
            else:
                acc += v
        base += s_a * BLOCK_A
    total = tl.div_rn(tl.sum(tl.sum(acc, axis=2), axis=0), divisor)
    tl.atomic_add(out_ptr + c, total, mask=c_mask, sem="relaxed")
    first = (pid_c == 0) & (pid_a == 0) & (pid_l == 0)
    if TAIL_ONE:
        if first:
            tl.store(out_ptr + C, 1.0)  # the bias entry of Ĥ
    if COMMIT:
        if first:
            _commit(h_src, h_dst, h_len, count_ptr, BLOCK_H)


@triton.jit
def _commit(h_src, h_dst, h_len, count_ptr, BLOCK_H: tl.constexpr):
    """pending[H] += Ĥ and pass count += 1, by one program (nothing else touches them)."""
    for start in range(0, h_len, BLOCK_H):
        i = start + tl.arange(0, BLOCK_H)
        m = i < h_len
        tl.store(h_dst + i, tl.load(h_dst + i, mask=m) + tl.load(h_src + i, mask=m), mask=m)
    tl.store(count_ptr, tl.load(count_ptr) + 1.0)


@triton.jit
def _square_sum_pair_kernel(sums, out, C, divisor, second, BLOCK: tl.constexpr):
    """Norm-layer Ĥ: ``out = [Σ_c sums[c]², second] / divisor`` (one program)."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, C, BLOCK):
        i = start + tl.arange(0, BLOCK)
        v = tl.load(sums + i, mask=i < C, other=0.0)
        acc += v * v
    tl.store(out, tl.div_rn(tl.sum(acc, axis=0), divisor))
    tl.store(out + 1, tl.div_rn(second, divisor))


@triton.jit
def _square_commit_kernel(
    sums, s_dst, C, divisor, h_src, h_dst, h_len, count_ptr, BLOCK: tl.constexpr
):
    """Norm-layer Ŝ and commit: ``pending[S] += sums² / divisor``, pending[H] += Ĥ, count += 1."""
    for start in range(0, C, BLOCK):
        i = start + tl.arange(0, BLOCK)
        m = i < C
        v = tl.load(sums + i, mask=m)
        tl.store(s_dst + i, tl.load(s_dst + i, mask=m) + tl.div_rn(v * v, divisor), mask=m)
    _commit(h_src, h_dst, h_len, count_ptr, BLOCK)


# --------------------------------------------------------------------------- host wrappers
class Commit:
    """What a backward pass adds besides Ŝ: the forward's Ĥ into ``h_dst`` and +1 into
    ``count`` (views into the pending buffer and the pass counts)."""

    def __init__(self, h_src: torch.Tensor, h_dst: torch.Tensor, count: torch.Tensor) -> None:
        self.h_src, self.h_dst, self.count = h_src, h_dst, count


def acl_view(x: torch.Tensor) -> tuple[int, int, int, int, int, int] | None:
    """``(A, C, L, s_a, s_c, s_l)`` when x's dims 2… merge into one strided dim, else None."""
    if x.dim() < 2:
        return None
    rest = [(n, s) for n, s in zip(x.shape[2:], x.stride()[2:]) if n != 1]
    for (_, outer), (n_inner, inner) in zip(rest, rest[1:]):
        if outer != inner * n_inner:
            return None
    length = math.prod(n for n, _ in rest)
    s_l = rest[-1][1] if rest else 1
    return x.shape[0], x.shape[1], length, x.stride(0), x.stride(1), s_l


def _as_acl(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int, int, int]]:
    view = acl_view(x)
    if view is None:  # rare layouts: copy once rather than mis-read
        x = x.contiguous()
        view = acl_view(x)
    return x, view


def sample_span(c: int, length: int, s_c: int, s_l: int) -> int:
    """The largest element offset inside one sample of an (A, C, L) view."""
    return (c - 1) * abs(s_c) + (length - 1) * abs(s_l)


def channel_reduce(
    x: torch.Tensor,
    out: torch.Tensor,
    divisor: float,
    *,
    square: bool,
    tail_one: bool = False,
    commit: Commit | None = None,
    wide: bool | None = None,
) -> None:
    """``out[c] += Σ_{a,l} f(x[a,c,l]) / divisor`` for x viewed as (A, C, L) (see module doc).

    ``tail_one`` also writes 1 at ``out[C]`` (bias entry); ``commit`` fuses a pass commit;
    ``wide`` forces 64-bit offsets (default: when a sample spans 2**31 elements or more)."""
    x, (a, c, length, s_a, s_c, s_l) = _as_acl(x)
    tile = tile_elements(x.device)
    if s_c == 1 and s_l != 1:  # channels contiguous: tile wide along C, reduce over L
        block_c = pow2(c, high=min(128, tile))
        block_l = pow2(length, high=max(1, tile // block_c))
    else:  # positions contiguous (or neither)
        block_l = pow2(length, high=min(1024, tile))
        block_c = pow2(c, high=max(1, tile // block_l))
    # A GPU walks samples one by one; the interpreter takes them all in one tile.
    block_a = 1 if x.device.type == "cuda" else pow2(a, high=max(1, tile // (block_c * block_l)))
    c_tiles = tiles(c, block_c)
    want = max(1, target_programs(x.device) // c_tiles)
    a_per, a_parts = split(a, want)
    l_per, l_parts = split(triton.cdiv(length, block_l), triton.cdiv(want, a_parts))
    l_per *= block_l
    if commit is None:
        h_src = h_dst = count = out
        h_len = 0
    else:
        h_src, h_dst, count, h_len = commit.h_src, commit.h_dst, commit.count, commit.h_src.numel()
    # one kernel variant on a GPU; the interpreter's cost grows with the tile
    block_h = 1024 if x.device.type == "cuda" else pow2(h_len, low=16, high=1024)
    _channel_reduce_kernel[(c_tiles, a_parts, l_parts)](
        x, out, a, c, length, s_a, s_c, s_l, a_per, l_per, float(divisor),
        h_src, h_dst, h_len, count,
        SQUARE=square, TAIL_ONE=tail_one, COMMIT=commit is not None,
        WIDE=sample_span(c, length, s_c, s_l) >= 2**31 if wide is None else wide,
        BLOCK_A=block_a, BLOCK_C=block_c, BLOCK_L=block_l, BLOCK_H=block_h,
    )


def square_sum_pair(sums: torch.Tensor, out: torch.Tensor, divisor: float, second: float) -> None:
    """``out[:2] = [Σ sums², second] / divisor`` (the two-entry norm-layer Ĥ)."""
    _square_sum_pair_kernel[(1,)](sums, out, sums.numel(), float(divisor), float(second),
                                  BLOCK=pow2(sums.numel(), low=16, high=1024))


def square_commit(
    sums: torch.Tensor, s_dst: torch.Tensor, divisor: float, commit: Commit
) -> None:
    """``s_dst += sums² / divisor`` plus the pass commit (the norm-layer Ŝ)."""
    _square_commit_kernel[(1,)](
        sums, s_dst, sums.numel(), float(divisor), commit.h_src, commit.h_dst,
        commit.h_src.numel(), commit.count, BLOCK=pow2(sums.numel(), low=16, high=1024),
    )
