"""Per-channel reductions behind every statistic except the conv Ĥ (docs/algorithm.md §2).

One kernel reads a tensor viewed as ``(A, C, L)`` (any strides) once and adds, per channel c,
``Σ_{a,l} f(x[a, c, l]) / divisor`` into ``out[c]`` (fp32, atomics), with ``f`` = square or
identity. Viewed that way it covers:

- Linear Ĥ / Ŝ: rows ``(N, D)`` as ``A = 1, C = D, L = N``: ``mean_rows(x²)``;
- Conv Ŝ: ``(B, C, positions)``: mean of g² per output channel (NCHW or channels_last);
- BatchNorm / LayerNorm: per-channel sums squared in the same launch (``post``): Ĥ's
  ``Σ_c s_c²`` and Ŝ's ``s_c²``; the programs then own whole channels.

Committing a backward pass (adding the forward's Ĥ into the pending buffer and +1 into the
layer's pass count) rides along in the Ŝ launch, its programs taking slices of Ĥ, so every
layer's pass costs one launch on the backward side. A plain Ĥ (Linear, norms, 1×1 conv) is
zeroed after reading (``Commit.clear``), so the next forward needs no zero-fill; a conv's
partial rows (``kernels.conv_patch``) are summed, in a fixed order, and need no zeroing.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._launch import cdiv, gpu_like, pow2, split, target_programs, tiles


@triton.jit
def _channel_reduce_kernel(
    x_ptr, out_ptr, A, C, L, s_a, s_c, s_l, a_per, l_per, divisor, post_divisor, second,
    h_src, h_dst, h_len, h_parts, h_part_stride, h_groups, h_per, count_ptr,
    SQUARE: tl.constexpr, POST: tl.constexpr, TAIL_ONE: tl.constexpr, COMMIT: tl.constexpr,
    CLEAR: tl.constexpr, H_TAIL: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr,
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
    first = (pid_c == 0) & (pid_a == 0) & (pid_l == 0)
    # POST 1 and 2 need a channel's whole sum: the host launches them without splitting A or L.
    if POST == 0:  # out[c] += total
        tl.atomic_add(out_ptr + c, total, mask=c_mask, sem="relaxed")
    elif POST == 1:  # out[c] += total² / post_divisor (norm-layer Ŝ from the gradient itself)
        tl.atomic_add(out_ptr + c, tl.div_rn(total * total, post_divisor), mask=c_mask,
                      sem="relaxed")
    else:  # out[0] += Σ_c total² / post_divisor, out[1] = second / post_divisor (norm Ĥ)
        squares = tl.where(c_mask, total * total, 0.0)
        tl.atomic_add(out_ptr, tl.div_rn(tl.sum(squares, axis=0), post_divisor), sem="relaxed")
        if first:
            tl.store(out_ptr + 1, tl.div_rn(second, post_divisor))
    if TAIL_ONE:
        if first:
            tl.store(out_ptr + C, 1.0)  # the bias entry of Ĥ
    if COMMIT:
        program = (pid_a * tl.num_programs(2) + pid_l) * tl.num_programs(0) + pid_c
        _commit(h_src, h_dst, h_len, h_parts, h_part_stride, h_groups, h_per, program,
                count_ptr, first, CLEAR, H_TAIL, BLOCK_P, BLOCK_H)


@triton.jit
def _commit(h_src, h_dst, h_len, h_parts, h_part_stride, h_groups, h_per, program, count_ptr,
            first, CLEAR: tl.constexpr, H_TAIL: tl.constexpr, BLOCK_P: tl.constexpr,
            BLOCK_H: tl.constexpr):
    """pending[H][j] += Σ_{p < h_parts} Σ_{g < h_groups} src[p·h_part_stride + g·h_len + j]
    for j < h_len (the forward's partial rows; one row and group for a plain Ĥ), program by
    program over slices of ``h_per`` elements, ``BLOCK_P`` rows a load: one writer per element,
    a fixed order. The first program adds 1 after them (H_TAIL: the bias entry) and +1 to the
    pass count. CLEAR zeroes a plain Ĥ after reading it, ready for the layer's next forward
    (which accumulates)."""
    lo = program.to(tl.int64) * h_per
    hi = tl.minimum(lo + h_per, h_len)
    rows = tl.arange(0, BLOCK_P)
    for start in range(lo, hi, BLOCK_H):
        i = start + tl.arange(0, BLOCK_H)
        m = i < hi
        acc = tl.zeros([BLOCK_P, BLOCK_H], tl.float32)
        # rows q = (part, group) pairs, BLOCK_P at a time
        for q0 in range(0, h_parts * h_groups, BLOCK_P):
            q = q0 + rows
            row = (q // h_groups).to(tl.int64) * h_part_stride + (q % h_groups) * h_len
            pm = (q < h_parts * h_groups)[:, None] & m[None, :]
            acc += tl.load(h_src + row[:, None] + i[None, :], mask=pm, other=0.0)
        total = tl.sum(acc, axis=0)
        tl.store(h_dst + i, tl.load(h_dst + i, mask=m) + total, mask=m)
        if CLEAR:
            tl.store(h_src + i, tl.zeros([BLOCK_H], tl.float32), mask=m)
    if first:
        if H_TAIL:
            tl.store(h_dst + h_len, tl.load(h_dst + h_len) + 1.0)
        tl.store(count_ptr, tl.load(count_ptr) + 1.0)


# --------------------------------------------------------------------------- host wrappers
class Commit:
    """What a backward pass adds besides Ŝ: the forward's Ĥ into ``h_dst`` and +1 into
    ``count`` (views into the pending buffer and the pass counts).

    ``h_src`` is either a plain Ĥ (``parts`` = ``groups`` = 1, ``h_len`` its length; ``clear``:
    zero it after reading, for a forward that accumulates into it) or a conv's partial rows:
    ``parts`` rows ``part_stride`` apart, each ``groups`` blocks of ``h_len`` floats, summed;
    ``tail``: then add 1 at ``h_dst[h_len]`` (the bias entry)."""

    def __init__(
        self,
        h_src: torch.Tensor,
        h_dst: torch.Tensor,
        count: torch.Tensor,
        clear: bool = False,
        *,
        h_len: int | None = None,
        parts: int = 1,
        part_stride: int = 0,
        groups: int = 1,
        tail: bool = False,
    ) -> None:
        self.h_src, self.h_dst, self.count, self.clear = h_src, h_dst, count, clear
        self.h_len = h_src.numel() if h_len is None else h_len
        self.parts, self.part_stride, self.groups, self.tail = parts, part_stride, groups, tail


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


class ReduceGeometry(NamedTuple):
    grid: tuple[int, int, int]
    a_per: int
    l_per: int
    block_a: int
    block_c: int
    block_l: int
    wide: bool


@functools.lru_cache(maxsize=4096)
def reduce_geometry(
    a: int, c: int, length: int, s_c: int, s_l: int, gpu: bool, programs: int, whole: bool
) -> ReduceGeometry:
    """Tiles and grid of one channel reduction (cached: a layer's shapes repeat every pass).
    ``whole``: each program owns whole channels (no split of A or L), for the POST modes and
    for a fixed-order, reproducible reduction."""
    tile = 4096 if gpu else 1 << 16
    if s_c == 1 and s_l != 1:  # channels contiguous: tile wide along C, reduce over L
        block_c = pow2(c, high=min(128, tile))
        block_l = pow2(length, high=max(1, tile // block_c))
    else:  # positions contiguous (or neither)
        block_l = pow2(length, high=min(1024, tile))
        block_c = pow2(c, high=max(1, tile // block_l))
    # A GPU walks samples one by one; the interpreter takes them all in one tile.
    block_a = 1 if gpu else pow2(a, high=max(1, tile // (block_c * block_l)))
    c_tiles = tiles(c, block_c)
    want = 1 if whole else max(1, programs // c_tiles)
    a_per, a_parts = split(a, want)
    l_per, l_parts = split(cdiv(length, block_l), cdiv(want, a_parts))
    wide = sample_span(c, length, s_c, s_l) >= 2**31
    return ReduceGeometry((c_tiles, a_parts, l_parts), a_per, l_per * block_l, block_a,
                          block_c, block_l, wide)


class ReduceLaunch(NamedTuple):
    """Everything of one channel-reduction launch but its tensors (a layer caches it)."""

    grid: tuple[int, int, int]
    ints: tuple  # A C L s_a s_c s_l a_per l_per divisor post_divisor second
    h_ints: tuple  # h_len parts part_stride groups h_per (the fused commit)
    constexprs: dict


def plan_reduce(
    view: tuple[int, int, int, int, int, int],
    device: torch.device,
    divisor: float,
    *,
    square: bool,
    tail_one: bool = False,
    commit: Commit | None = None,
    wide: bool | None = None,
    post: int = 0,
    post_divisor: float = 1.0,
    second: float = 0.0,
    deterministic: bool = False,
) -> ReduceLaunch:
    """The launch of ``channel_reduce`` for a tensor whose ``acl_view`` is ``view``."""
    a, c, length, s_a, s_c, s_l = view
    gpu = gpu_like(device)
    geo = reduce_geometry(a, c, length, s_c, s_l, gpu, target_programs(device),
                          post != 0 or deterministic)
    if commit is None:
        h_len = parts = part_stride = groups = 0
    else:
        h_len, parts, part_stride = commit.h_len, commit.parts, commit.part_stride
        groups = commit.groups
    # On a GPU the programs share the commit in slices of whole blocks: a plain Ĥ 64 floats a
    # load, partial rows 64 rows × 32 floats (many loads in flight, 2 variants in all); the
    # interpreter's cost grows with the tile.
    if gpu:
        block_p, block_h = (1, 64) if parts <= 1 else (64, 32)
        h_per = block_h * cdiv(cdiv(max(h_len, 1), block_h), math.prod(geo.grid))
    else:
        block_h = pow2(h_len, low=16, high=1 << 16)
        block_p = pow2(parts * groups, high=max(1, (1 << 16) // block_h))
        h_per = max(h_len, 1)
    return ReduceLaunch(
        geo.grid,
        (a, c, length, s_a, s_c, s_l, geo.a_per, geo.l_per, float(divisor),
         float(post_divisor), float(second)),
        (h_len, parts, part_stride, groups, h_per),
        dict(SQUARE=square, POST=post, TAIL_ONE=tail_one, COMMIT=commit is not None,
             CLEAR=commit is not None and commit.clear,
             H_TAIL=commit is not None and commit.tail, WIDE=geo.wide if wide is None else wide,
             BLOCK_A=geo.block_a, BLOCK_C=geo.block_c, BLOCK_L=geo.block_l, BLOCK_P=block_p,
             BLOCK_H=block_h),
    )


def launch_reduce(
    plan: ReduceLaunch,
    x: torch.Tensor,
    out: torch.Tensor,
    h_src: torch.Tensor | None = None,
    h_dst: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
) -> None:
    """Run a planned reduction; x is read from its first element with the planned strides."""
    if h_src is None:
        h_src = h_dst = count = out
    _channel_reduce_kernel[plan.grid](x, out, *plan.ints, h_src, h_dst, *plan.h_ints, count,
                                      **plan.constexprs)


def channel_reduce(
    x: torch.Tensor,
    out: torch.Tensor,
    divisor: float,
    *,
    square: bool,
    tail_one: bool = False,
    commit: Commit | None = None,
    wide: bool | None = None,
    post: int = 0,
    post_divisor: float = 1.0,
    second: float = 0.0,
    deterministic: bool = False,
) -> None:
    """``out[c] += Σ_{a,l} f(x[a,c,l]) / divisor`` for x viewed as (A, C, L) (see module doc).

    ``post`` 1: ``out[c] += (Σ_{a,l} f / divisor)² / post_divisor``; ``post`` 2:
    ``out[0] += Σ_c (Σ_{a,l} f / divisor)² / post_divisor`` and ``out[1] = second /
    post_divisor``. ``tail_one`` also writes 1 at ``out[C]`` (bias entry); ``commit`` fuses a
    pass commit; ``wide`` forces 64-bit offsets (default: when a sample spans 2**31 elements or
    more); ``deterministic``: each output element gets one writer, summing in a fixed order."""
    x, view = _as_acl(x)
    plan = plan_reduce(view, x.device, divisor, square=square, tail_one=tail_one,
                       commit=commit, wide=wide, post=post, post_divisor=post_divisor,
                       second=second, deterministic=deterministic)
    if commit is None:
        launch_reduce(plan, x, out)
    else:
        launch_reduce(plan, x, out, commit.h_src, commit.h_dst, commit.count)
