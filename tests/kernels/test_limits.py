"""Size limits, checked on the launch plan (meta tensors, launches recorded and not run): 64-bit
offsets where a sample spans 2**31 elements or more, no grid axis 1 or 2 past CUDA's 65,535,
16-byte-aligned scratch after Ĥ of any length, and the 1×1 shortcut's values."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from kernel_testing import DEVICE, randn, rel_err
from torch import nn

from adafisher.backends import triton_statistics
from adafisher.conv_statistics import conv_input_statistic
from adafisher.layers import LayerKind

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.launch_census import LaunchCensus  # noqa: E402

META = torch.device("meta")
GRID_Y_Z = 65_535
GRID_X = 2**31 - 1


def _plan(module: nn.Module, kind: LayerKind, x: torch.Tensor) -> list:
    with LaunchCensus(run=False) as census, census.count() as seen:
        triton_statistics.input_statistic(kind, module, x)
    return seen.grids


def _within_limits(grids: list) -> None:
    for _, grid, _ in grids:
        assert 1 <= grid[0] <= GRID_X and grid[1] <= GRID_Y_Z and grid[2] <= GRID_Y_Z, grid


def test_conv_sample_over_2_31_elements_takes_64_bit_offsets():
    x = torch.empty(2, 2, 2**16, 2**15 + 8, device=META)  # 4.3e9 elements per sample
    grids = _plan(nn.Conv2d(2, 4, 3, padding=1), LayerKind.CONV, x)
    flags = {name: constexprs["WIDE"] for name, _, constexprs in grids}
    assert flags == {"patch_partials_kernel": True}
    _within_limits(grids)


def test_large_volume_keeps_grid_axes_within_limits():
    """536M elements per sample: positions go on grid axis 0 (the old y axis held 131,072)."""
    x = torch.empty(1, 1, 1024, 1024, 512, device=META)
    grids = _plan(nn.Conv3d(1, 2, 3, padding=1), LayerKind.CONV, x)
    assert {name for name, _, _ in grids} == {"patch_partials_kernel"}
    assert not any(constexprs["WIDE"] for _, _, constexprs in grids)
    _within_limits(grids)


def test_many_kernel_offsets_and_channels_fit_the_grid():
    x = torch.empty(1, 4096, 64, 64, device=META)
    grids = _plan(nn.Conv2d(4096, 8, 17, padding=8), LayerKind.CONV, x)
    _within_limits(grids)


def test_linear_rows_over_2_31_elements_take_64_bit_offsets():
    grids = _plan(nn.Linear(1025, 4), LayerKind.LINEAR, torch.empty(2**21, 1025, device=META))
    assert [constexprs["WIDE"] for _, _, constexprs in grids] == [True]
    _within_limits(grids)


@pytest.mark.parametrize("h_len", [1, 2, 3, 5, 37, 64])
def test_scratch_of_any_length_is_16_byte_aligned(h_len):
    """Each layer's scratch is its own allocation (a zeroed Ĥ, or a conv's partial rows): its
    alignment never depends on another length."""
    pool = triton_statistics.ScratchPool()
    linear, conv = nn.Linear(2, 2), nn.Conv2d(1, 1, 3)
    h = pool.acquire(linear, h_len, DEVICE)
    rows = pool.acquire(conv, 100 + h_len, DEVICE, zeroed=False)
    assert h.numel() == h_len and rows.numel() == 100 + h_len
    assert h.data_ptr() % 16 == 0 and rows.data_ptr() % 16 == 0
    assert not h.any()


@pytest.mark.parametrize("make,shape,channels_last", [
    (lambda: nn.Conv2d(5, 3, 1), (2, 5, 6, 7), False),
    (lambda: nn.Conv2d(5, 3, 1, stride=2), (2, 5, 7, 6), True),  # one strided view
    (lambda: nn.Conv2d(5, 3, 1, stride=2, bias=False), (2, 5, 7, 6), False),  # no one view
    (lambda: nn.Conv1d(4, 3, 1, stride=3), (2, 4, 11), False),
    (lambda: nn.Conv3d(2, 3, 1, stride=(1, 2, 1)), (2, 2, 3, 5, 4), False),
])
def test_pointwise_conv_statistic_is_the_mean_of_sampled_squares(make, shape, channels_last):
    """A 1×1 conv without padding reads x at o·stride: Ĥ[c] = mean over the batch and those
    positions of x², whatever the stride (derived, then checked against the reference)."""
    conv = make().to(DEVICE)
    x = randn(*shape, seed=3)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    got = triton_statistics.total(triton_statistics.conv_input_statistic(conv, x))
    assert rel_err(got, conv_input_statistic(conv, x)) < 1e-6
    sampled = x[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in conv.stride)]
    mean = sampled.square().transpose(0, 1).reshape(x.shape[1], -1).mean(1)
    assert rel_err(got[: x.shape[1]], mean) < 1e-6
