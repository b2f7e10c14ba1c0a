"""kernels/reductions.py against plain torch sums."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, LOW_PRECISION, randn, rel_err

from adafisher.kernels.reductions import (
    Commit,
    acl_view,
    channel_reduce,
    reduce_geometry,
)


def _reference(x: torch.Tensor, divisor: float, square: bool) -> torch.Tensor:
    """Σ over dim 0 and dims 2… per dim-1 channel, fp32."""
    v = x.float()
    v = v * v if square else v
    return v.transpose(0, 1).reshape(x.shape[1], -1).sum(1) / divisor


def _inputs(layout: str, dtype: torch.dtype) -> torch.Tensor:
    if layout == "nchw":
        return randn(3, 5, 7, 4, dtype=dtype)
    if layout == "channels_last":
        return randn(2, 6, 5, 7, dtype=dtype).to(memory_format=torch.channels_last)
    if layout == "rows":  # a Linear's (N, D) rows as (1, D, N)
        return randn(17, 431, dtype=dtype).t().unsqueeze(0)
    if layout == "single":
        return randn(1, 1, dtype=dtype)
    if layout == "wide_c":
        return randn(4, 123, dtype=dtype)
    raise AssertionError(layout)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows", "single", "wide_c"])
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
@pytest.mark.parametrize("square", [True, False])
def test_channel_reduce_accumulates(layout: str, dtype: torch.dtype, square: bool) -> None:
    x = _inputs(layout, dtype)
    channels = x.shape[1]
    prior = randn(channels, seed=1)
    out = torch.cat([prior, torch.full((3,), float("nan"), device=DEVICE)])
    channel_reduce(x, out, 7.0, square=square)
    expected = prior + _reference(x, 7.0, square)
    assert rel_err(out[:channels], expected) < 1e-6
    assert out[channels:].isnan().all()  # nothing written past the channels


def test_channel_reduce_tail_one_and_commit() -> None:
    x = randn(6, 9)
    out = torch.full((10,), float("nan"), device=DEVICE)
    out[:9] = 0
    channel_reduce(x, out, 6.0, square=True, tail_one=True)
    assert out[9].item() == 1.0
    assert rel_err(out[:9], _reference(x, 6.0, True)) < 1e-6

    h_src, h_prior, count = randn(5, seed=2), randn(5, seed=3), torch.full((1,), 2.0, device=DEVICE)
    h_dst = h_prior.clone()
    s_out = randn(9, seed=4)
    s_prior = s_out.clone()
    channel_reduce(x, s_out, 1.0, square=False, commit=Commit(h_src, h_dst, count))
    assert rel_err(s_out, s_prior + _reference(x, 1.0, False)) < 1e-6
    assert torch.equal(h_dst, h_prior + h_src)
    assert count.item() == 3.0


def test_wide_offsets_match() -> None:
    """The 64-bit offset path (activations over 2**31 elements) on a small input."""
    x = randn(11, 37).t().unsqueeze(0)
    narrow, wide = torch.zeros(37, device=DEVICE), torch.zeros(37, device=DEVICE)
    channel_reduce(x, narrow, 11.0, square=True, wide=False)
    channel_reduce(x, wide, 11.0, square=True, wide=True)
    assert torch.allclose(narrow, wide, rtol=1e-6, atol=0)
    assert rel_err(wide, _reference(x, 11.0, True)) < 1e-6


def test_unmergeable_layout_is_copied() -> None:
    x = randn(2, 3, 8, 5)[:, :, ::2, :]  # strided dims 2 and 3 cannot merge
    assert acl_view(x) is None
    out = torch.zeros(3, device=DEVICE)
    channel_reduce(x, out, 1.0, square=True)
    assert rel_err(out, _reference(x, 1.0, True)) < 1e-6


def test_acl_view_merges_trailing_dims() -> None:
    x = torch.empty(2, 4, 3, 5, 6).to(memory_format=torch.channels_last_3d)
    assert acl_view(x) == (2, 4, 90, x.stride(0), 1, 4)
    assert acl_view(torch.empty(3, 7)) == (3, 7, 1, 7, 1, 1)
    assert acl_view(torch.empty(5)) is None


@pytest.mark.parametrize("channels", [1, 6, 1500])
def test_post_square_sum_writes_both_entries(channels: int) -> None:
    """post 2 (norm-layer Ĥ): ``out[0] += Σ_c (Σ x / divisor)²/pd``, ``out[1] = second/pd``."""
    x = randn(3, channels, 5, seed=5)
    out = torch.full((3,), float("nan"), device=DEVICE)
    out[0] = 0.0
    channel_reduce(x, out, 4.0, square=False, post=2, post_divisor=16.0, second=channels)
    sums = _reference(x, 4.0, False)
    assert rel_err(out[:1], sums.square().sum().reshape(1) / 16.0) < 1e-6
    assert out[1].item() == pytest.approx(channels / 16.0, rel=1e-7)
    assert out[2].isnan()


@pytest.mark.parametrize("channels", [1, 7, 1100])
def test_post_square_with_commit_and_clear(channels: int) -> None:
    """post 1 (norm-layer Ŝ) fused with a commit that zeroes its source."""
    g, s_prior = randn(4, channels, seed=6), randn(channels, seed=7)
    h_src, h_prior = randn(2, seed=8), randn(2, seed=9)
    h_copy = h_src.clone()
    s_dst, h_dst = s_prior.clone(), h_prior.clone()
    count = torch.zeros(1, device=DEVICE)
    channel_reduce(g, s_dst, 1.0, square=False, post=1, post_divisor=3.0,
                   commit=Commit(h_src, h_dst, count, clear=True))
    assert rel_err(s_dst, s_prior + _reference(g, 1.0, False).square() / 3.0) < 1e-6
    assert torch.equal(h_dst, h_prior + h_copy)
    assert count.item() == 1.0
    assert not h_src.any()


@pytest.mark.parametrize("parts,groups,h_len,tail", [(1, 1, 5, False), (3, 2, 7, True),
                                                     (5, 1, 130, True), (2, 4, 1, False)])
def test_commit_sums_partial_rows_and_groups(parts, groups, h_len, tail) -> None:
    """A conv's partial rows: ``h_dst[j] += Σ_p Σ_g src[p·stride + g·h_len + j]``, then +1 at
    ``h_dst[h_len]`` (bias); the gaps between rows and what follows Ĥ are not touched."""
    stride = groups * h_len + 3  # rows need not be packed
    src = randn(parts * stride, seed=12)
    src_copy = src.clone()
    prior = randn(h_len + 2, seed=13)
    h_dst = prior.clone()
    count = torch.full((1,), 4.0, device=DEVICE)
    channel_reduce(randn(3, 6, seed=14), randn(6, seed=15), 1.0, square=True,
                   commit=Commit(src, h_dst, count, h_len=h_len, parts=parts,
                                 part_stride=stride, groups=groups, tail=tail))
    rows = src_copy.view(parts, stride)[:, : groups * h_len].reshape(parts * groups, h_len)
    assert rel_err(h_dst[:h_len], prior[:h_len] + rows.sum(0)) < 1e-6
    assert h_dst[h_len].item() == pytest.approx(prior[h_len].item() + float(tail), abs=1e-6)
    assert h_dst[h_len + 1].item() == prior[h_len + 1].item()
    assert torch.equal(src, src_copy)  # partial rows are not cleared
    assert count.item() == 5.0


def test_geometry_splits_only_when_allowed() -> None:
    """On a GPU a reduction spreads over programs; ``whole`` (post modes, deterministic mode)
    gives each program whole channels: one writer per output element."""
    split = reduce_geometry(256, 64, 3136, 3136, 1, True, 1056, False)
    whole = reduce_geometry(256, 64, 3136, 3136, 1, True, 1056, True)
    assert split.grid[1] * split.grid[2] > 1
    assert whole.grid[1:] == (1, 1)
    assert whole.a_per == 256 and whole.l_per >= 3136


def test_commit_slices_over_gpu_sized_grids(monkeypatch) -> None:
    """With GPU geometry (planned here, run by the interpreter) the commit's slices of 64
    floats go to many programs: each element is still summed once."""
    from adafisher.kernels import reductions  # noqa: PLC0415

    monkeypatch.setattr(reductions, "gpu_like", lambda device: True)
    monkeypatch.setattr(reductions, "target_programs", lambda device: 16)
    parts, h_len = 3, 300
    src = randn(parts * h_len, seed=16)
    h_dst = torch.zeros(h_len + 1, device=DEVICE)
    count = torch.zeros(1, device=DEVICE)
    g = randn(4, 8, 33, seed=17)
    s_dst = torch.zeros(8, device=DEVICE)
    geo = reductions.reduce_geometry(4, 8, 33, 33, 1, True, 16, False)
    assert geo.grid[0] * geo.grid[1] * geo.grid[2] > 1  # the slices spread over programs
    channel_reduce(g, s_dst, 1.0, square=True, commit=Commit(
        src, h_dst, count, h_len=h_len, parts=parts, part_stride=h_len, tail=True))
    assert rel_err(h_dst[:h_len], src.view(parts, h_len).sum(0)) < 1e-6
    assert h_dst[h_len].item() == 1.0 and count.item() == 1.0
    assert rel_err(s_dst, _reference(g, 1.0, True)) < 1e-6
