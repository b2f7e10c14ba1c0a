"""The AdaFisher / AdaFisherW update for up to ``SLOTS`` parameters per launch
(docs/algorithm.md §5, §6); launched by the ``adafisher::triton_fused_step`` op
(``adafisher/triton_ops.py``), which groups parameters by device and dtype.

The parameters', gradients' and momenta's tensors are kernel arguments (one slot each), so
``torch.compile`` can trace the launch (``torch.library.wrap_triton``): no raw addresses in a
device table. Each program takes one chunk of one slot, found in the int64 ``layout`` tensor:
``(slot, chunk number)`` per program, then ``FIELDS`` integers per slot (sizes, F's row length
with its division magic, factor offsets, layer, where its step size is). ``layout`` depends on
shapes and offsets only: it is built once per parameter set. The per-step values (the step
sizes ``lr/(1−βᵗ)`` and the decoupled decay ``1 − lr·wd``) arrive in the float64
``coefficients`` tensor, computed on the device from the step counts and lr.

Whole tiles run unmasked, with 16-byte vector loads and stores when every slot's addresses are
16-byte aligned (Triton specializes pointer arguments on that; chunk starts are multiples of
CHUNK); the ragged end of a parameter runs masked. F's row and column come from a
multiply-shift division by the row length.

F = S[row]·H[col] + λ is formed in registers; whether the layer has factors yet is read from
``blended`` on the device, so the host never waits. Math is fp32 for fp16/bf16/fp32 params, in
the reference's order (``adafisher.functional.adafisher_update``); p and m are stored back in
the parameter's dtype. Hyperparameters are runtime arguments: changing them compiles nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

# Tile and chunk sizes on a GPU (elements): untuned guesses, no GPU was available when written.
GPU_BLOCK = 1024
GPU_CHUNK = 8 * GPU_BLOCK
# Under the interpreter a program is Python: one tile per parameter, as small as fits.
CPU_BLOCK = 1 << 16
# Parameters per launch: the kernel takes their tensors as arguments (traceable, no address
# table), one slot each.
SLOTS = 16
# per slot: numel, cols (+ its division magic, shift), inner (+ magic, shift), s_offset,
# h_offset, layer, index of its step size in ``coefficients``
FIELDS = 11
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _divmod(n, d, magic, shift):
    """``(n // d, n % d)`` for 0 ≤ n < 2**31 by multiply-shift (``division_magic``): a GPU
    divides by a runtime integer in ~25 instructions, this takes a few."""
    q = ((n.to(tl.int64) * magic) >> shift).to(tl.int32)
    return q, n - q * d


@triton.jit
def _bf16_rne(x):
    """fp32 → bf16 rounding to nearest even, as torch and the GPU do (the Triton interpreter's
    own cast truncates), NaN kept a NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    sign = bits & 0x80000000
    mag = bits & 0x7FFFFFFF
    rounded = (mag + 0x7FFF + ((mag >> 16) & 1)) >> 16
    rounded = tl.where(mag > 0x7F800000, 0x7FC0, rounded)
    return (rounded | (sign >> 16)).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _store(ptr, value, mask):
    """Store fp32 ``value`` in ``ptr``'s element type (``mask`` None: every lane)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        out = _bf16_rne(value)
    else:
        out = value.to(ptr.dtype.element_ty)
    if mask is None:
        tl.store(ptr, out)
    else:
        tl.store(ptr, out, mask=mask)


@triton.jit
def _update_tile(
    p_ptr, g_ptr, m_ptr, i, mask, factors, use_f, row0, col0, cols, cols_magic, cols_shift,
    inner, inner_magic, inner_shift, spatial, s_off, h_off, neg_step,
    grad_sign, beta, one_minus_beta, weight_decay, decay, damping, WD_MODE: tl.constexpr,
):
    """One tile of the update; ``mask`` is None for full tiles (vectorizable loads)."""
    if mask is None:
        p = tl.load(p_ptr + i).to(tl.float32)
        g = tl.load(g_ptr + i).to(tl.float32)
        m = tl.load(m_ptr + i).to(tl.float32)
    else:
        p = tl.load(p_ptr + i, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + i, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + i, mask=mask, other=0.0).to(tl.float32)
    g = g * grad_sign  # ±1: exact; −1 maximizes (before weight decay, as torch.optim)
    if WD_MODE == 1:  # L2: g ← g + wd·p
        g = g + weight_decay * p
    m = m * beta + one_minus_beta * g
    if WD_MODE == 2:  # decoupled: p ← p·(1 − lr·wd), with p before the update
        p = p * decay
    if use_f:
        r, c = _divmod(col0 + i, cols, cols_magic, cols_shift)
        if inner != cols:  # channels_last weight: memory order (k…, c_in) within a row
            k, ch = _divmod(c, inner, inner_magic, inner_shift)
            c = ch * spatial + k
        # r and c stay inside the parameter for masked-off lanes too: no mask needed
        s = tl.load(factors + s_off + row0 + r, mask=mask)
        h = tl.load(factors + h_off + c, mask=mask)
        p = p + tl.div_rn(neg_step * m, s * h + damping)  # IEEE, as torch
    else:
        p = p + neg_step * m
    _store(p_ptr + i, p, mask)
    _store(m_ptr + i, m, mask)


@triton.jit
def _pick(slot, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14,
          a15):
    """Argument number ``slot`` of sixteen: one kernel body serves every slot (and a pointer
    chosen among aligned arguments stays known-aligned to the compiler)."""
    out = tl.where(slot == 1, a1, a0)
    out = tl.where(slot == 2, a2, out)
    out = tl.where(slot == 3, a3, out)
    out = tl.where(slot == 4, a4, out)
    out = tl.where(slot == 5, a5, out)
    out = tl.where(slot == 6, a6, out)
    out = tl.where(slot == 7, a7, out)
    out = tl.where(slot == 8, a8, out)
    out = tl.where(slot == 9, a9, out)
    out = tl.where(slot == 10, a10, out)
    out = tl.where(slot == 11, a11, out)
    out = tl.where(slot == 12, a12, out)
    out = tl.where(slot == 13, a13, out)
    out = tl.where(slot == 14, a14, out)
    out = tl.where(slot == 15, a15, out)
    return out


@triton.jit
def _step_kernel(
    p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15,
    g0, g1, g2, g3, g4, g5, g6, g7, g8, g9, g10, g11, g12, g13, g14, g15,
    m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15,
    layout, coefficients, factors, blended,
    grad_sign, beta, one_minus_beta, weight_decay, damping,
    WD_MODE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, FIELDS: tl.constexpr,
):
    pid = tl.program_id(0)
    slot = tl.load(layout + 2 * pid)
    start = tl.load(layout + 2 * pid + 1) * CHUNK  # a multiple of CHUNK: alignment is kept
    row = layout + 2 * tl.num_programs(0) + slot * FIELDS
    p_ptr = _pick(slot, p0, p1, p2, p3, p4, p5, p6, p7,
                  p8, p9, p10, p11, p12, p13, p14, p15) + start
    g_ptr = _pick(slot, g0, g1, g2, g3, g4, g5, g6, g7,
                  g8, g9, g10, g11, g12, g13, g14, g15) + start
    m_ptr = _pick(slot, m0, m1, m2, m3, m4, m5, m6, m7,
                  m8, m9, m10, m11, m12, m13, m14, m15) + start
    numel = tl.load(row)
    cols = tl.load(row + 1).to(tl.int32)
    cols_magic = tl.load(row + 2)
    cols_shift = tl.load(row + 3)
    inner = tl.load(row + 4).to(tl.int32)
    inner_magic = tl.load(row + 5)
    inner_shift = tl.load(row + 6)
    s_off = tl.load(row + 7)
    h_off = tl.load(row + 8)
    layer = tl.load(row + 9)
    # coefficients: [1 − lr·wd, lr/(1−βᵗ) per parameter…] in float64, computed on the device
    neg_step = -tl.load(coefficients + tl.load(row + 10)).to(tl.float32)
    decay = tl.load(coefficients).to(tl.float32)
    # F is used iff the parameter has a layer and both its factors were blended at least once.
    safe = tl.maximum(layer, 0)
    use_f = (layer >= 0) & tl.load(blended + 2 * safe) & tl.load(blended + 2 * safe + 1)
    n = tl.minimum(numel - start, CHUNK).to(tl.int32)
    row0 = start // cols  # 64-bit scalar math once per program; per element only 32-bit
    col0 = (start - row0 * cols).to(tl.int32)
    spatial = cols // inner
    full = n // BLOCK * BLOCK
    for it in range(0, full, BLOCK):  # whole tiles: no mask
        _update_tile(p_ptr, g_ptr, m_ptr, it + tl.arange(0, BLOCK), None, factors, use_f,
                     row0, col0, cols, cols_magic, cols_shift, inner, inner_magic, inner_shift,
                     spatial, s_off, h_off, neg_step, grad_sign, beta, one_minus_beta,
                     weight_decay, decay, damping, WD_MODE)
    if full < n:  # the ragged end of the parameter
        i = full + tl.arange(0, BLOCK)
        _update_tile(p_ptr, g_ptr, m_ptr, i, i < n, factors, use_f,
                     row0, col0, cols, cols_magic, cols_shift, inner, inner_magic, inner_shift,
                     spatial, s_off, h_off, neg_step, grad_sign, beta, one_minus_beta,
                     weight_decay, decay, damping, WD_MODE)


def division_magic(d: int) -> tuple[int, int]:
    """``(magic, shift)`` with ``n // d == (n · magic) >> shift`` for every 0 ≤ n < 2**31
    (Granlund–Montgomery: ℓ = ⌈log₂ d⌉, magic = ⌈2**(31+ℓ) / d⌉ < 2**32, so n · magic < 2**63)."""
    if not 1 <= d < 2**31:
        raise ValueError(f"divisor must be in [1, 2**31), got {d}")
    ell = (d - 1).bit_length()
    shift = 31 + ell
    return -(-(1 << shift) // d), shift




def tile_sizes(largest: int, gpu: bool) -> tuple[int, int]:
    """``(BLOCK, CHUNK)`` for a launch whose largest parameter has ``largest`` elements."""
    if gpu:
        return GPU_BLOCK, GPU_CHUNK
    block = min(CPU_BLOCK, triton.next_power_of_2(max(16, largest)))
    return block, block


def layout_values(
    numels: Sequence[int],
    cols: Sequence[int],
    inners: Sequence[int],
    s_offsets: Sequence[int],
    h_offsets: Sequence[int],
    layers: Sequence[int],
    coefficient_index: Sequence[int],
    chunk: int,
) -> tuple[list[int], int]:
    """The int64 ``layout`` of one launch of at most ``SLOTS`` parameters, and its number of
    programs: ``(slot, chunk number)`` per program, then ``FIELDS`` integers per slot.
    Untracked parameters have ``layers[i] < 0`` (their ``cols``/``inners`` are 1)."""
    if len(numels) > SLOTS:
        raise ValueError(f"one launch takes at most {SLOTS} parameters, got {len(numels)}")
    if chunk % 8 or max(cols, default=1) + chunk >= 2**31:
        raise ValueError("chunk must be a multiple of 8, and cols + chunk < 2**31")
    chunks = [v for slot, n in enumerate(numels) for k in range(-(-n // chunk)) for v in (slot, k)]
    rows = []
    for i, n in enumerate(numels):
        rows += [n, cols[i], *_magic(cols[i]), inners[i], *_magic(inners[i]), s_offsets[i],
                 h_offsets[i], layers[i], coefficient_index[i]]
    return chunks + rows, len(chunks) // 2


@functools.lru_cache(maxsize=4096)
def _magic(d: int) -> tuple[int, int]:
    return division_magic(d)
