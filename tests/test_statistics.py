"""Ĥ and Ŝ of every layer type against the float64 definitions (SPEC §2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from adafisher import statistics
from adafisher.conv_statistics import conv_input_statistic
from adafisher.layers import LayerKind

import definitions as ref


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=1e-9)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(7,), (3, 5), (2, 3, 4), ()])
def test_linear_statistics(bias, lead):
    layer = nn.Linear(13, 6, bias=bias)
    x = torch.randn(*lead, 13) * 3 + 1
    g = torch.randn(*lead, 6)
    close(statistics.linear_input_statistic(layer, x), ref.linear_h(x, bias))
    close(statistics.linear_output_statistic(layer, g), ref.linear_s(g))


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(6, 9, (7, 5), stride=2, dilation=2, groups=3, padding=(3, 1)),
        nn.Conv2d(5, 7, 1, bias=False),
        nn.Conv2d(3, 3, 3, padding="same", padding_mode="reflect"),
        nn.Conv2d(4, 8, (2, 3), stride=(1, 2), padding=(1, 0), padding_mode="circular"),
    ],
    ids=["7x5-s2-d2-g3", "1x1-nobias", "same-reflect", "nonsquare-circular"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_conv_statistics_named_shapes(conv, dtype):
    x = (torch.randn(3, conv.in_channels, 15, 13) + 0.3).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    h = conv_input_statistic(conv, x)
    close(h, ref.conv_h(conv, x), rtol=1e-5)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op allocates (views excluded), and the ops called."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        inputs = {
            a.untyped_storage().data_ptr()
            for a in [*args, *(kwargs or {}).values()]
            if isinstance(a, torch.Tensor)
        }
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_conv_statistic_memory_does_not_grow_with_batch(monkeypatch):
    # a small reduction chunk so that both batches below exceed it
    monkeypatch.setattr("adafisher.conv_statistics._REDUCE_CHUNK_ELEMENTS", 1 << 15)
    conv = nn.Conv2d(8, 8, 3, padding=1, stride=2)
    peaks = {}
    for batch in (64, 256):
        x = torch.randn(batch, 8, 32, 32)
        with _LargestTensor() as probe:
            conv_input_statistic(conv, x)
        peaks[batch] = probe.largest
        assert not any("im2col" in op or "unfold" in op for op in probe.ops), probe.ops
    assert peaks[64] == peaks[256]
    assert peaks[256] < x.numel() * x.element_size() / 8  # far below one copy of the input


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.BatchNorm1d(5), (6, 5)),
        (nn.BatchNorm1d(5), (6, 5, 7)),
        (nn.BatchNorm2d(4), (3, 4, 5, 6)),
        (nn.BatchNorm3d(3), (2, 3, 4, 3, 5)),
    ],
)
def test_batchnorm_statistics(layer, shape):
    x = torch.randn(shape) + 0.7
    g = torch.randn(shape)
    close(statistics.batchnorm_input_statistic(layer, x), ref.batchnorm_h(x))
    close(statistics.batchnorm_output_statistic(layer, g, shape[0]), ref.batchnorm_s(g, shape[0]))


@pytest.mark.parametrize(
    "normalized, shape",
    [((10,), (4, 10)), ((10,), (4, 6, 10)), ((6, 10), (3, 6, 10)), ((5,), (2, 3, 4, 5))],
)
def test_layernorm_statistics(normalized, shape):
    layer = nn.LayerNorm(normalized)
    x = torch.randn(shape) + 0.2
    g = torch.randn(shape)
    close(statistics.layernorm_input_statistic(layer, x), ref.layernorm_h(x))
    close(
        statistics.layernorm_output_statistic(layer, g, shape[0]),
        ref.layernorm_s(g, len(normalized), shape[0]),
    )


def test_low_precision_inputs_give_fp32_statistics():
    layer = nn.Linear(9, 4)
    x = torch.randn(5, 9).to(torch.bfloat16)
    h = statistics.input_statistic(LayerKind.LINEAR, layer, x)
    assert h.dtype == torch.float32
    close(h, ref.linear_h(x, True))
