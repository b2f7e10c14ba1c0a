"""kernels/conv_patch.py against the reference ``adafisher.conv_statistics``."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, LOW_PRECISION, randn, rel_err
from torch import nn

from adafisher.backends import triton_statistics
from adafisher.conv_statistics import batch_sum_of_squares, conv_input_statistic
from adafisher.kernels import conv_patch


def kernel_statistic(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return triton_statistics.total(triton_statistics.conv_input_statistic(conv, x))


# (name, conv, input shape)
CASES = [
    ("7x5_s2_d2_g3", lambda: nn.Conv2d(6, 9, (7, 5), stride=2, dilation=2, groups=3,
                                       padding=(3, 1)), (3, 6, 17, 15)),
    ("1x1_nobias", lambda: nn.Conv2d(3, 4, 1, bias=False), (2, 3, 5, 5)),
    ("1x1_single_channel", lambda: nn.Conv2d(1, 1, 1), (2, 1, 1, 1)),
    ("3x3_same", lambda: nn.Conv2d(4, 5, 3, padding="same"), (2, 4, 6, 7)),
    ("4x4_same_even", lambda: nn.Conv2d(2, 3, 4, padding="same"), (2, 2, 7, 6)),
    ("depthwise", lambda: nn.Conv2d(5, 5, 3, groups=5, padding=1, stride=2), (2, 5, 9, 8)),
    ("conv1d", lambda: nn.Conv1d(4, 4, 3, padding=2, dilation=2), (2, 4, 9)),
    ("conv3d", lambda: nn.Conv3d(2, 4, 3, stride=(1, 2, 1), padding=1), (2, 2, 5, 6, 4)),
    ("reflect", lambda: nn.Conv2d(4, 4, 3, padding=2, padding_mode="reflect"), (2, 4, 7, 6)),
    ("circular", lambda: nn.Conv2d(2, 4, 4, padding="same", padding_mode="circular"),
     (2, 2, 7, 6)),
    ("replicate", lambda: nn.Conv1d(3, 2, 5, padding=3, padding_mode="replicate"), (2, 3, 8)),
]


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 4:
        return x.to(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.to(memory_format=torch.channels_last_3d)
    return x.transpose(1, 2).contiguous().transpose(1, 2)  # channels innermost for 1-d


@pytest.mark.parametrize("name,make,shape", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_input_statistic_matches_reference(name, make, shape, channels_last) -> None:
    torch.manual_seed(0)
    conv = make().to(DEVICE)
    x = randn(*shape, seed=1)
    if channels_last:
        x = _channels_last(x)
    h = kernel_statistic(conv, x)
    expected = conv_input_statistic(conv, x)
    assert h.shape == expected.shape and h.dtype == torch.float32
    assert rel_err(h, expected) < 1e-6


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("channels_last", [False, True])
def test_low_precision_inputs(dtype: torch.dtype, channels_last: bool) -> None:
    name, make, shape = CASES[0]
    conv = make().to(DEVICE)
    x = randn(*shape, dtype=dtype, seed=2)
    if channels_last:
        x = _channels_last(x)
    assert rel_err(kernel_statistic(conv, x), conv_input_statistic(conv, x)) < 1e-6


def test_unbatched_input() -> None:
    conv = nn.Conv2d(3, 2, 3, padding=1).to(DEVICE)
    x = randn(3, 5, 4, seed=3)
    assert rel_err(kernel_statistic(conv, x), conv_input_statistic(conv, x)) < 1e-6


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_squares_folds_groups(groups: int, channels_last: bool) -> None:
    x = randn(4, 6, 5, 3, seed=4)
    if channels_last:
        x = _channels_last(x)
    x2, o_sc, o_sl = conv_patch.batch_squares(x, groups)
    per_group = 6 // groups
    expected = batch_sum_of_squares(x).reshape(groups, per_group, 15).sum(0)
    got = x2.view(per_group, 15) if o_sl == 1 else x2.view(15, per_group).T
    assert (o_sc, o_sl) == (15, 1)  # channel-major: the patch stage reads positions in a row
    assert rel_err(got, expected) < 1e-6


def test_empty_output_is_an_error() -> None:
    conv = nn.Conv2d(1, 1, 5).to(DEVICE)
    with pytest.raises(ValueError, match="empty"):
        kernel_statistic(conv, randn(1, 1, 3, 3))


@pytest.mark.parametrize("groups", [1, 2])
def test_strided_channels_take_the_two_dimensional_path(groups: int) -> None:
    """Positions contiguous but channels further apart than a sample's positions (a sliced
    buffer): not one flat run per sample."""
    conv = nn.Conv1d(4, 2, 3, padding=1, groups=groups).to(DEVICE)
    x = randn(3, 4, 11, seed=5)[:, :, :8]
    assert x.stride() == (44, 11, 1)
    assert rel_err(kernel_statistic(conv, x), conv_input_statistic(conv, x)) < 1e-6


ZERO_PADDED = [case for case in CASES if case[0] not in ("reflect", "circular", "replicate")]
ZERO_PADDED += [
    ("1x1_s2_nchw", lambda: nn.Conv2d(5, 3, 1, stride=2), (2, 5, 7, 6)),
    ("1x1_s3x2_padded", lambda: nn.Conv2d(3, 2, 1, stride=(3, 2), padding=1), (3, 3, 8, 7)),
    ("1x1_s2_conv3d", lambda: nn.Conv3d(2, 3, 1, stride=2), (2, 2, 5, 3, 4)),
    ("nonsquare_s_d", lambda: nn.Conv2d(3, 4, (2, 5), stride=(3, 1), dilation=(1, 2),
                                        padding=(2, 0)), (1, 3, 11, 13)),
]


@pytest.mark.parametrize("name,make,shape", ZERO_PADDED, ids=[c[0] for c in ZERO_PADDED])
@pytest.mark.parametrize("channels_last", [False, True])
def test_partials_overwrite_poisoned_storage(name, make, shape, channels_last) -> None:
    """One launch writes every partial row (NaN-poisoned storage, nothing zeroed first), and
    their sum is the reference Ĥ."""
    conv = make().to(DEVICE)
    x = randn(*shape, seed=6)
    if channels_last:
        x = _channels_last(x)
    partial = conv_patch.conv_input_partials(
        x, conv.groups, tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation),
        triton_statistics.conv_padding(conv), conv.bias is not None,
        storage=lambda n: torch.full((n,), float("nan"), device=DEVICE))
    assert partial.parts.numel() == partial.n_parts * partial.groups * partial.h_core
    assert rel_err(partial.total(), conv_input_statistic(conv, x)) < 1e-6


def test_geometry_bounds_partials_by_what_a_part_reads() -> None:
    """Splitting the batch for parallelism stops where the partial rows (C·Πk floats a part)
    would pass 1/16 of what a part reads: ResNet-50's stem and a 3×3 conv at batch 256."""
    for channels, spatial, kernel, stride, pad in ((3, (224, 224), (7, 7), (2, 2), (3, 3)),
                                                   (64, (56, 56), (3, 3), (1, 1), (1, 1)),
                                                   (512, (7, 7), (3, 3), (1, 1), (1, 1))):
        outs = tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(spatial, kernel, stride,
                                                                    pad))
        geo = conv_patch.partials_geometry(256, channels, spatial, 1, channels, kernel, stride,
                                           (1, 1), pad, outs, True, 1056)
        read = 256 * channels * spatial[0] * spatial[1]
        assert geo.n_parts * geo.row <= read / 16
        assert geo.grid[0] * geo.grid[1] * geo.grid[2] >= 8  # still spread over programs
