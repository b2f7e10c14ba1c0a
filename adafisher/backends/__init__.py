"""Backend selection. Every backend implements the verbs of ``base.Backend``."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .. import ops
from .base import Backend, GroupStep
from .torch_backend import TorchBackend

BACKENDS = ("auto", "torch", "triton", "native")

__all__ = ["BACKENDS", "Backend", "GroupStep", "TorchBackend", "resolve_backend"]


def resolve_backend(name: str, devices: Iterable[torch.device]) -> Backend:
    """The backend for ``name``; ``"auto"`` picks Triton for CUDA parameters when it can run,
    else the compiled kernels of ``adafisher._C`` when they serve every device (CPU), else the
    torch backend (saying once when the extension is missing). An unknown or unusable name
    raises ValueError."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, one of {BACKENDS}, got {type(name).__name__}")
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    devices = set(devices)
    if name == "torch":
        return TorchBackend()
    from . import native_backend  # noqa: PLC0415

    if name == "native":
        return native_backend.NativeBackend.create(devices)
    from . import triton_backend  # noqa: PLC0415 - Triton is optional

    if name == "triton":
        return triton_backend.TritonBackend.create(devices)
    if triton_backend.usable_on(devices):
        return triton_backend.TritonBackend.create(devices)
    if native_backend.usable_on(devices):
        return native_backend.NativeBackend()
    if any(d.type == "cpu" for d in devices):
        ops.warn_native_unavailable()
    return TorchBackend()
