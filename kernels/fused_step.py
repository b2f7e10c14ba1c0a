"""The AdaFisher / AdaFisherW update for many parameters in one launch (docs/algorithm.md §5, §6).

One launch per (device, parameter dtype, gradient dtype) group. Each program takes one chunk
of one parameter, found through two int64 device tables:

- a *chunk table* ``(parameter slot, first element)`` per chunk, cached per list of sizes;
- a *parameter table*, ``_FIELDS`` int64 per parameter: the raw addresses of p, g and m (cast to
  typed pointers in the kernel), sizes, the layer's factor offsets and layer index, and the
  per-parameter ``−lr/(1−βᵗ)`` as float64 bits (t may differ between parameters). It is rebuilt
  on the host each step and uploaded only when it changed, with a non-blocking copy.

Whole tiles run unmasked and, when every address is 16-byte aligned (the usual case), with
16-byte vector loads and stores; the ragged end of a parameter runs masked. F's row and column
come from a multiply-shift division by the row length, computed per parameter on the host.

F = S[row]·H[col] + λ is formed in registers; whether the layer has factors yet is read from
``blended`` on the device, so the host never waits. Math is fp32 for fp16/bf16/fp32 params, in
the reference's order (``adafisher.functional.adafisher_update``); p and m are stored back in
the parameter's dtype. Hyperparameters are runtime arguments: changing them compiles nothing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._launch import gpu_like
from ._tables import device_table, float_bits

# Tile and chunk sizes on a GPU (elements): untuned guesses, no GPU was available when written.
GPU_BLOCK = 1024
GPU_CHUNK = 8 * GPU_BLOCK
# Under the interpreter a program is Python: one tile per parameter, as small as fits.
CPU_BLOCK = 1 << 16
# p, g, m, numel, cols (+ its division magic, shift), inner (+ magic, shift), s_offset,
# h_offset, layer, −step size (float64 bits)
_FIELDS = 14
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
def _step_kernel(
    meta, chunks, factors, blended, p_type, g_type,
    grad_sign, beta, one_minus_beta, weight_decay, decay, damping,
    WD_MODE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, FIELDS: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0)
    slot = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    row = meta + slot * FIELDS
    p_ptr = tl.load(row).to(p_type.dtype, bitcast=True) + start
    g_ptr = tl.load(row + 1).to(g_type.dtype, bitcast=True) + start
    m_ptr = tl.load(row + 2).to(p_type.dtype, bitcast=True) + start
    if ALIGNED:  # every address 16-byte aligned, chunk starts too: vector loads and stores
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
    numel = tl.load(row + 3)
    cols = tl.load(row + 4).to(tl.int32)
    cols_magic = tl.load(row + 5)
    cols_shift = tl.load(row + 6)
    inner = tl.load(row + 7).to(tl.int32)
    inner_magic = tl.load(row + 8)
    inner_shift = tl.load(row + 9)
    s_off = tl.load(row + 10)
    h_off = tl.load(row + 11)
    layer = tl.load(row + 12)
    neg_step = tl.load(row + 13).to(tl.float64, bitcast=True).to(tl.float32)
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


class FactorPlace(NamedTuple):
    """Where a parameter's F comes from: ``F[r, c] = S[s_offset + r]·H[h_offset + c] + λ`` for
    the parameter viewed as ``(rows, cols)``, usable once layer ``layer`` is blended."""

    layer: int
    cols: int
    h_offset: int
    s_offset: int


@dataclass
class StepItem:
    """One parameter's share of a fused step. ``inner`` maps memory order to F's column:
    ``cols`` for row-major weights, ``C_in`` for channels_last conv weights."""

    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    step: int
    index: FactorPlace | None
    inner: int


class StepTables:
    """Device tables and small constant tensors reused across steps (per device and group)."""

    def __init__(self) -> None:
        self._chunks: dict[tuple, torch.Tensor] = {}
        self._meta: dict[tuple, tuple[list[int], torch.Tensor]] = {}
        self._constants: dict[tuple, torch.Tensor] = {}

    def chunks(self, sizes: tuple[int, ...], chunk: int, device: torch.device) -> torch.Tensor:
        key = (device, sizes, chunk)
        table = self._chunks.get(key)
        if table is None:
            values = [
                v for slot, n in enumerate(sizes) for first in range(0, n, chunk)
                for v in (slot, first)
            ]
            table = self._chunks[key] = device_table(values, device)
            if len(self._chunks) > 64:  # parameter sets come and go (tests, add_param_group)
                self._chunks.pop(next(iter(self._chunks)))
        return table

    def meta(self, key: tuple, values: list[int], device: torch.device) -> torch.Tensor:
        cached = self._meta.get(key)
        if cached is not None and cached[0] == values:
            return cached[1]
        table = device_table(values, device)
        self._meta[key] = (values, table)
        if len(self._meta) > 64:
            self._meta.pop(next(iter(self._meta)))
        return table

    @staticmethod
    @functools.lru_cache(maxsize=4096)
    def magic(d: int) -> tuple[int, int]:
        return division_magic(d)

    def constant(self, kind: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A one-element tensor typing a pointer (``witness``) or a stand-in ``blended``."""
        key = (kind, dtype, device)
        value = self._constants.get(key)
        if value is None:
            value = self._constants[key] = torch.zeros(2, dtype=dtype, device=device)
        return value


def fused_step(
    items: list[StepItem],
    factors: torch.Tensor | None,
    blended: torch.Tensor | None,
    *,
    lr: float,
    beta: float,
    weight_decay: float,
    damping: float,
    decoupled: bool,
    tables: StepTables,
    block: int | None = None,
    chunk: int | None = None,
    maximize: bool = False,
) -> None:
    """docs/algorithm.md §6 for ``items`` (same device, parameter and gradient dtype), one launch.

    ``factors``/``blended`` are the flat buffers of the device's layers (None when no item
    has a layer). ``block``/``chunk`` override the tile and chunk sizes (tests, tuning);
    ``maximize`` steps along +gradient."""
    if not items:
        return
    device = items[0].param.device
    p_dtype, g_dtype = items[0].param.dtype, items[0].grad.dtype
    values: list[int] = []
    for item in items:
        index = item.index
        neg_step = float_bits(-(lr / (1 - beta**item.step)))
        if index is None:
            cols, inner, place = 1, 1, (0, 0, -1)
        else:
            cols, inner = index.cols, item.inner
            place = (index.s_offset, index.h_offset, index.layer)
        values += [
            item.param.data_ptr(), item.grad.data_ptr(), item.exp_avg.data_ptr(),
            item.param.numel(), cols, *tables.magic(cols), inner, *tables.magic(inner),
            *place, neg_step,
        ]
    on_gpu = gpu_like(device)  # meta: shapes-only runs plan for a GPU
    if not on_gpu:
        cpu_block = triton.next_power_of_2(max(16, max(item.param.numel() for item in items)))
        block = block or min(CPU_BLOCK, cpu_block)
        chunk = chunk or block
    block = block or GPU_BLOCK
    chunk = chunk or GPU_CHUNK
    widest = max((item.index.cols for item in items if item.index is not None), default=1)
    if chunk % block or chunk % 8 or widest + chunk >= 2**31:
        raise ValueError("chunk must be a multiple of block and of 8, and cols + chunk < 2**31")
    sizes = tuple(item.param.numel() for item in items)
    chunk_table = tables.chunks(sizes, chunk, device)
    n_chunks = chunk_table.numel() // 2
    if n_chunks == 0:
        return
    meta = tables.meta((device, p_dtype, g_dtype, sizes), values, device)
    if factors is None:
        factors = tables.constant("factors", torch.float32, device)
        blended = tables.constant("blended", torch.bool, device)
    wd_mode = 0 if weight_decay == 0 else (2 if decoupled else 1)
    aligned = all(a % 16 == 0 for v in range(0, len(values), _FIELDS) for a in values[v : v + 3])
    _step_kernel[(n_chunks,)](
        meta, chunk_table, factors, blended,
        tables.constant("witness", p_dtype, device), tables.constant("witness", g_dtype, device),
        -1.0 if maximize else 1.0, beta, 1 - beta, weight_decay, 1 - lr * weight_decay, damping,
        WD_MODE=wd_mode, CHUNK=chunk, BLOCK=block, FIELDS=_FIELDS, ALIGNED=aligned,
        num_warps=4,
    )
