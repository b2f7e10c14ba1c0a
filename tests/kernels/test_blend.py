"""kernels/blend.py through ``adafisher::triton_update_factors`` (normalize + blend, SPEC §3)
against ``torch_backend.update_factors``."""

from __future__ import annotations

import copy

import pytest
import torch
from kernel_testing import DEVICE, randn, rel_err

from adafisher import triton_ops  # noqa: F401  (registers the ops)
from adafisher.backends import torch_backend
from adafisher.backends.triton_backend import SegmentOffsets
from adafisher.factors import FactorBuffers
from adafisher.kernels import blend
from adafisher.layers import LayerKind

# (h_len, s_len) per layer: single-element factors, odd widths, one long segment
SIZES = [(1, 1), (2, 7), (124, 123), (1, 431), (37, 2), (5, 1)]


def _buffers(seed: int) -> FactorBuffers:
    buffers = FactorBuffers(DEVICE)
    for i, (h_len, s_len) in enumerate(SIZES):
        buffers.add_layer(f"l{i}", LayerKind.LINEAR, h_len, s_len)
    n = len(SIZES)
    buffers.factors.copy_(randn(buffers.total, seed=seed).abs() + 0.1)
    buffers.pending.copy_(randn(buffers.total, seed=seed + 1).abs() * 3)
    # passes per layer: none, one, several (the average divides by them)
    buffers.pending_count.copy_(torch.tensor([1.0, 0.0, 3.0, 2.0, 1.0, 4.0][:n]))
    buffers.blended.copy_(torch.tensor([True, False] * n))
    buffers.nonfinite.copy_(torch.arange(2 * n))
    buffers.has_pending = True
    return buffers


def update_factors(buffers, gammas, eps, tables, block=None):
    """The op on a FactorBuffers (the backend's translation, inlined); ``block`` forces the
    kernel's tile size."""
    with pytest.MonkeyPatch.context() as patch:
        if block is not None:
            patch.setattr(blend, "tile_size", lambda longest, gpu: block)
        torch.ops.adafisher.triton_update_factors(
            buffers.factors, buffers.pending, buffers.pending_count, buffers.blended,
            buffers.nonfinite, tables.get(buffers), 1.0 - gammas[0], gammas[1], eps)
    buffers.has_pending = False


def _state(buffers: FactorBuffers) -> dict[str, torch.Tensor]:
    return {k: getattr(buffers, k) for k in
            ("factors", "pending", "pending_count", "blended", "nonfinite")}


def _compare(ours: FactorBuffers, ref: FactorBuffers) -> None:
    a, b = _state(ours), _state(ref)
    assert rel_err(a["factors"], b["factors"]) < 1e-6
    for key in ("pending", "pending_count", "blended", "nonfinite"):
        assert torch.equal(a[key], b[key]), key
    assert ours.has_pending is False and ref.has_pending is False


@pytest.mark.parametrize("gammas", [(0.92, 0.008), (0.05, 0.05), (1.0, 0.0)])
@pytest.mark.parametrize("block", [None, 16])  # 16: several tiles per segment
def test_blend_matches_torch(gammas, block) -> None:
    ours, ref = _buffers(seed=3), _buffers(seed=3)
    update_factors(ours, gammas, torch_backend.NORMALIZATION_EPS, SegmentOffsets(), block=block)
    torch_backend.update_factors(ref, gammas)
    _compare(ours, ref)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_segments_are_discarded_and_counted(bad: float) -> None:
    ours, ref = _buffers(seed=5), _buffers(seed=5)
    for buffers in (ours, ref):
        buffers.pending[SIZES[0][0] + 3] = bad  # layer 1's S: no passes, so not counted
        buffers.pending[0] = bad  # layer 0's H, active
        s2 = sum(SIZES[0]) + sum(SIZES[1]) + SIZES[2][0]
        buffers.pending[s2 + 100] = bad  # layer 2's S, active
    before = ours.factors.clone()
    update_factors(ours, (0.92, 0.008), torch_backend.NORMALIZATION_EPS, SegmentOffsets())
    torch_backend.update_factors(ref, (0.92, 0.008))
    _compare(ours, ref)
    assert torch.equal(ours.factors[:1], before[:1])  # discarded: factor kept
    assert ours.nonfinite[0].item() == 1  # was 0, +1


def test_tables_follow_added_layers() -> None:
    """A new layer (``add_param_group``) is seen by the next update (tables rebuilt)."""
    tables = SegmentOffsets()
    ours, ref = _buffers(seed=7), _buffers(seed=7)
    update_factors(ours, (0.5, 0.5), 1e-6, tables)
    torch_backend.update_factors(ref, (0.5, 0.5))
    for buffers in (ours, ref):
        buffers.add_layer("late", LayerKind.LAYERNORM, 2, 9)
        buffers.pending[-11:] = torch.arange(1.0, 12.0)
        buffers.pending_count[-1] = 1.0
    update_factors(ours, (0.5, 0.5), 1e-6, tables)
    torch_backend.update_factors(ref, (0.5, 0.5))
    _compare(ours, ref)
    assert ours.blended[-2:].all()


def test_constant_statistics_normalize_to_zero() -> None:
    """max == min: the eps keeps the division finite and v' = 0."""
    ours = _buffers(seed=9)
    ref = copy.deepcopy(ours)
    ours.pending.fill_(2.5)
    ref.pending.fill_(2.5)
    update_factors(ours, (0.1, 0.3), 1e-6, SegmentOffsets())
    torch_backend.update_factors(ref, (0.1, 0.3))
    _compare(ours, ref)
