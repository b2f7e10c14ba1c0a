"""Normalize and blend every layer's pending statistics in one launch (docs/algorithm.md §3);
launched by the ``adafisher::triton_update_factors`` op (``adafisher/triton_ops.py``).

One program per layer, over its H and S segments of the flat buffers (segment ``k`` is
``[segment_offsets[k], segment_offsets[k + 1])``, the op schema's layout): fresh = pending / passes;
a segment holding NaN/±Inf is discarded and counted; otherwise min-max normalize
(``(v − min) / (max − min + eps)``) and blend ``factor ← factor·(1 − γ₁) + γ₂·v'``. Then the
pending sums and pass counts are cleared. Same semantics as ``torch_backend.update_factors``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._launch import pow2

# Globals read inside a compiled kernel must be constexpr.
_FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _segment(
    factors, pending, blended, nonfinite, seg, off, n, count, keep, new, eps,
    BLOCK: tl.constexpr,
):
    active = count > 0.0
    passes = tl.maximum(count, 1.0)
    lo = tl.full([], _FLT_MAX, tl.float32)
    hi = tl.full([], -_FLT_MAX, tl.float32)
    bad = tl.full([], 0, tl.int32)
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        m = i < n
        v = tl.div_rn(tl.load(pending + off + i, mask=m, other=0.0), passes)
        finite = tl.abs(v) <= _FLT_MAX  # False for ±Inf and NaN
        bad = tl.maximum(bad, tl.max((m & ~finite).to(tl.int32), axis=0))
        clean = tl.where(finite, v, 0.0)
        lo = tl.minimum(lo, tl.min(tl.where(m, clean, _FLT_MAX), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(m, clean, -_FLT_MAX), axis=0))
    ok = active & (bad == 0)
    # Broadcast `ok` through an int: the interpreter mistypes splatted scalar comparisons.
    ok_i = ok.to(tl.int32)
    denom = hi - lo + eps
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        m = i < n
        v = tl.div_rn(tl.load(pending + off + i, mask=m, other=0.0), passes)
        clean = tl.where(tl.abs(v) <= _FLT_MAX, v, 0.0)
        f = tl.load(factors + off + i, mask=m, other=0.0)
        blend = m & ((i * 0 + ok_i) != 0)
        tl.store(factors + off + i, f * keep + tl.div_rn(clean - lo, denom) * new, mask=blend)
        tl.store(pending + off + i, tl.zeros([BLOCK], tl.float32), mask=m)
    tl.store(blended + seg, tl.load(blended + seg) | ok)
    tl.store(nonfinite + seg, tl.load(nonfinite + seg) + (active & (bad != 0)).to(tl.int64))


@triton.jit
def _blend_kernel(
    factors, pending, count_ptr, blended, nonfinite, segment_offsets, keep, new, eps,
    BLOCK: tl.constexpr,
):
    layer = tl.program_id(0)
    count = tl.load(count_ptr + layer)
    for side in tl.static_range(2):  # segment 2·layer is H, 2·layer + 1 is S
        seg = 2 * layer + side
        off = tl.load(segment_offsets + seg)
        n = (tl.load(segment_offsets + seg + 1) - off).to(tl.int32)
        _segment(factors, pending, blended, nonfinite, seg, off, n, count, keep, new, eps,
                 BLOCK)
    # Both segments have read the count: only now clear it.
    tl.store(count_ptr + layer, 0.0)


def tile_size(longest: int, gpu: bool) -> int:
    """``BLOCK`` for segments of at most ``longest`` entries (any bound will do: a longer
    segment is walked in tiles)."""
    return pow2(longest, low=16, high=1024 if gpu else 1 << 16)
