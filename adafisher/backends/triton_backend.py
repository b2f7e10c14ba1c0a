"""Placeholder until the Triton kernels land: reports itself unavailable."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def usable_on(devices: Iterable[torch.device]) -> bool:
    return False


class TritonBackend:
    name = "triton"

    @classmethod
    def create(cls, devices: Iterable[torch.device]) -> TritonBackend:
        raise ValueError("backend='triton' is not available in this build; use 'torch' or 'auto'")
