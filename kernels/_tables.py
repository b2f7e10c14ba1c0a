"""Small device-side tables (offsets, pointers) built on the host without synchronizing.

On CUDA the host list goes through pinned memory and a non-blocking copy: the host never waits
for the device. The caching host allocator keeps a pinned block alive until its copy has run,
so reusing it later is safe.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import torch


def device_table(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """int64 tensor of ``values`` on ``device``, copied asynchronously on CUDA."""
    host = torch.tensor(values, dtype=torch.int64, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True) if device.type == "cuda" else host


def float_bits(value: float) -> int:
    """The int64 whose bits are the float64 ``value`` (read back with a bitcast in a kernel)."""
    return struct.unpack("<q", struct.pack("<d", value))[0]
