"""Launch-configuration helpers shared by the kernels.

Under ``TRITON_INTERPRET=1`` every program of a grid runs as Python on the CPU, so the
interpreter wants few programs with big tiles; a GPU wants enough programs to fill its SMs.
"""

from __future__ import annotations

import functools

import torch


def interpreted(kernel: object) -> bool:
    """Whether ``kernel`` was built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


# Plain-Python integer helpers: ``triton.cdiv`` and ``triton.next_power_of_2`` are jitted
# functions whose host-side call costs microseconds each, a dozen times per layer and pass.
def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for integers, b > 0."""
    return -(-a // b)


def pow2(n: int, low: int = 1, high: int | None = None) -> int:
    """The next power of two ≥ n, clamped to [low, high]."""
    value = max(low, 1 << (max(1, int(n)) - 1).bit_length())
    return min(value, high) if high is not None else value


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Shapes-only runs (meta device: launch census, specialization keys) plan for an H100/H200.
_META_SMS = 132


def gpu_like(device: torch.device) -> bool:
    """Plan launches for a GPU: CUDA tensors, and meta tensors (shapes-only runs)."""
    return device.type in ("cuda", "meta")


def target_programs(device: torch.device) -> int:
    """About how many programs a reduction should spread over (a few waves per SM)."""
    if device.type == "meta":
        return 8 * _META_SMS
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return 8 * _sm_count(index)


def tile_elements(device: torch.device) -> int:
    """Elements per tile: registers on a GPU, numpy vector length under the interpreter."""
    return 4096 if gpu_like(device) else 1 << 16


def split(total: int, parts: int) -> tuple[int, int]:
    """``(per_part, n_parts)`` covering ``total`` items with at most ``parts`` parts; at least
    one part of at least one item, so an empty extent still launches the program that writes
    a bias entry or commits a pass."""
    parts = max(1, min(int(parts), int(total)))
    per = max(1, cdiv(total, parts))
    return per, max(1, cdiv(total, per))


def tiles(total: int, block: int) -> int:
    """Tiles of ``block`` covering ``total`` (at least one: see ``split``)."""
    return max(1, cdiv(total, block))
