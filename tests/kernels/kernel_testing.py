"""Shared helpers of the kernel tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from adafisher.kernels import fused_step  # noqa: E402
from adafisher.kernels._launch import interpreted  # noqa: E402

INTERPRETED = interpreted(fused_step._step_kernel)
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip(
        "Triton kernels were imported without TRITON_INTERPRET=1 and there is no GPU",
        allow_module_level=True,
    )
DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
LOW_PRECISION = (torch.float16, torch.bfloat16)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected| (0 when both are all zero)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    return diff / scale if scale else diff


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int | None = None) -> torch.Tensor:
    """Fresh random values (never zeros) on the test device."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)
