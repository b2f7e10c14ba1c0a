"""adafisher/backends/triton_statistics.py (the kernels per layer kind) against the reference
statistics and the torch backend."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, LOW_PRECISION, randn, rel_err
from torch import nn

from adafisher import statistics
from adafisher.backends import triton_statistics as layer_statistics
from adafisher.backends.torch_backend import TorchBackend
from adafisher.factors import FactorBuffers
from adafisher.layers import factor_sizes, layer_kind

# (name, layer, input shape, output-gradient shape)
LAYERS = [
    ("linear_3d", lambda: nn.Linear(123, 5), (2, 3, 123), (2, 3, 5)),
    ("linear_nobias", lambda: nn.Linear(7, 431, bias=False), (4, 7), (4, 431)),
    ("linear_1x1", lambda: nn.Linear(1, 1), (3, 1), (3, 1)),
    ("linear_unbatched", lambda: nn.Linear(6, 2), (6,), (2,)),
    ("conv", lambda: nn.Conv2d(6, 9, (7, 5), stride=2, dilation=2, groups=3, padding=(3, 1)),
     (3, 6, 17, 15), (3, 9, 9, 7)),
    ("conv1d_nobias", lambda: nn.Conv1d(2, 3, 3, bias=False), (2, 2, 6), (2, 3, 4)),
    ("batchnorm2d", lambda: nn.BatchNorm2d(5), (4, 5, 3, 2), (4, 5, 3, 2)),
    ("batchnorm1d", lambda: nn.BatchNorm1d(6), (4, 6), (4, 6)),
    ("batchnorm1d_seq", lambda: nn.BatchNorm1d(3), (2, 3, 7), (2, 3, 7)),
    ("layernorm", lambda: nn.LayerNorm(9), (2, 4, 9), (2, 4, 9)),
    ("layernorm_2d_shape", lambda: nn.LayerNorm([3, 4]), (5, 2, 3, 4), (5, 2, 3, 4)),
    ("layernorm_flat", lambda: nn.LayerNorm(11), (3, 11), (3, 11)),
]
IDS = [case[0] for case in LAYERS]


def _buffers(modules: list[nn.Module]) -> tuple[FactorBuffers, list]:
    """Flat buffers for several layers, pending sums and counts already holding random values
    (a running accumulation)."""
    buffers = FactorBuffers(DEVICE)
    slots = []
    for i, module in enumerate(modules):
        kind = layer_kind(module)
        slots.append(buffers.add_layer(f"l{i}", kind, *factor_sizes(kind, module)))
    buffers.pending.copy_(randn(buffers.total, seed=11).abs())
    buffers.pending_count.copy_(torch.arange(len(modules), dtype=torch.float32))
    return buffers, slots


def _with_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.to(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@pytest.mark.parametrize("name,make,x_shape,g_shape", LAYERS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
def test_statistics_match_torch_backend(name, make, x_shape, g_shape, dtype) -> None:
    torch.manual_seed(0)
    module = make().to(DEVICE)
    kind = layer_kind(module)
    x, g = randn(*x_shape, dtype=dtype, seed=1), randn(*g_shape, dtype=dtype, seed=2)
    channels_last = name == "batchnorm2d" and dtype == torch.float32
    x, g = _with_layout(x, channels_last), _with_layout(g, channels_last)
    batch = statistics.batch_size(kind, x)

    h = layer_statistics.input_statistic(kind, module, x)
    expected_h = statistics.input_statistic(kind, module, x)
    h_total = layer_statistics.total(h)
    assert h_total.dtype == torch.float32 and h_total.shape == expected_h.shape
    assert rel_err(h_total, expected_h) < 1e-6

    # commit into the middle layer of three: neighbours must stay untouched
    others = [nn.Linear(3, 2).to(DEVICE), module, nn.LayerNorm(4).to(DEVICE)]
    ours, slots = _buffers(others)
    ref, _ = _buffers(others)
    before = ours.pending.clone()
    layer_statistics.commit_pass(ours, slots[1], module, h, g, batch)
    TorchBackend().commit_pass(ref, slots[1], module, expected_h, g, batch)
    assert rel_err(ours.pending, ref.pending) < 1e-6
    assert torch.equal(ours.pending_count, ref.pending_count)
    untouched = torch.ones_like(before, dtype=torch.bool)
    untouched[slots[1].h_offset : slots[1].s_offset + slots[1].s_len] = False
    assert torch.equal(ours.pending[untouched], before[untouched])


def test_accumulation_is_a_running_sum() -> None:
    """Two passes into the same slot equal the sum of their statistics (gradient accumulation)."""
    module = nn.Linear(5, 3).to(DEVICE)
    kind = layer_kind(module)
    buffers = FactorBuffers(DEVICE)
    slot = buffers.add_layer("fc", kind, *factor_sizes(kind, module))
    expected = torch.zeros_like(buffers.pending)
    for seed in (1, 2):
        x, g = randn(4, 5, seed=seed), randn(4, 3, seed=seed + 10)
        h = layer_statistics.input_statistic(kind, module, x)
        layer_statistics.commit_pass(buffers, slot, module, h, g, 4)
        expected += torch.cat([statistics.input_statistic(kind, module, x),
                               statistics.output_statistic(kind, module, g, 4)])
    assert rel_err(buffers.pending, expected) < 1e-6
    assert buffers.pending_count.item() == 2.0


PLANNED = [
    ("conv_patch", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 7, 6), (2, 4, 4, 3)),
    ("conv_1x1", lambda: nn.Conv2d(3, 4, 1), (2, 3, 5, 4), (2, 4, 5, 4)),
    ("linear", lambda: nn.Linear(6, 5), (2, 3, 6), (2, 3, 5)),
    ("batchnorm", lambda: nn.BatchNorm2d(3), (4, 3, 2, 5), (4, 3, 2, 5)),
    ("layernorm", lambda: nn.LayerNorm(6), (2, 3, 6), (2, 3, 6)),
]


@pytest.mark.parametrize("name,make,x_shape,g_shape", PLANNED, ids=[c[0] for c in PLANNED])
def test_planned_launches_follow_shape_and_layout_changes(name, make, x_shape, g_shape,
                                                          monkeypatch) -> None:
    """With a pool, a layer's launches are planned at its first pass per input shape and
    layout and looked up after: passes alternating batch sizes and layouts (NCHW,
    channels_last) still match the torch backend, and repeated shapes plan nothing."""
    module = make().to(DEVICE)
    kind = layer_kind(module)
    pool = layer_statistics.ScratchPool()
    ours, slots = _buffers([module])
    ref, _ = _buffers([module])
    planned = []
    for name_ in ("plan_reduce", "plan_partials"):
        original = getattr(layer_statistics, name_)

        def counting(*args, _original=original, _name=name_, **kwargs):
            planned.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(layer_statistics, name_, counting)
    variants = [(3, False), (3, True), (5, False), (3, False), (3, True)]
    counts = []
    for seed, (batch, channels_last) in enumerate(variants):
        x = randn(batch, *x_shape[1:], seed=20 + seed)
        g = randn(batch, *g_shape[1:], seed=40 + seed)
        x, g = _with_layout(x, channels_last), _with_layout(g, channels_last)
        before = len(planned)
        h = layer_statistics.input_statistic(kind, module, x, pool)
        layer_statistics.commit_pass(ours, slots[0], module, h, g, batch, pool)
        counts.append(len(planned) - before)
        TorchBackend().commit_pass(ref, slots[0], module, statistics.input_statistic(
            kind, module, x), g, batch)
        assert rel_err(ours.pending, ref.pending) < 1e-6, (batch, channels_last)
    assert counts[0] >= 1 and counts[-2:] == [0, 0]  # seen before: looked up, not planned
    assert torch.equal(ours.pending_count, ref.pending_count)


def test_settle_sums_partial_rows_and_frees_the_scratch() -> None:
    """A commit outside the kernels (torch fallback) gets Ĥ itself, and the conv's pooled
    partial rows are free for its next forward (the same storage, not a new allocation)."""
    conv = nn.Conv2d(2, 4, 3, padding=1, groups=2).to(DEVICE)
    pool = layer_statistics.ScratchPool()
    x = randn(3, 2, 5, 4, seed=30)
    first = layer_statistics.input_statistic(layer_kind(conv), conv, x, pool)
    h = layer_statistics.settle(first, conv, pool)
    assert rel_err(h, statistics.input_statistic(layer_kind(conv), conv, x)) < 1e-6
    second = layer_statistics.input_statistic(layer_kind(conv), conv, x, pool)
    assert second.parts is first.parts
