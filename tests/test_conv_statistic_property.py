"""The conv statistic against the unfold-based definition over many random configurations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adafisher.conv_statistics import conv_input_statistic, conv_output_statistic

import definitions as ref

# hypothesis is a test extra; a GPU machine without it still runs every other test module
hypothesis = pytest.importorskip("hypothesis")
given, settings, st = hypothesis.given, hypothesis.settings, hypothesis.strategies


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-9)


conv_configs = st.fixed_dictionaries(
    {
        "nd": st.sampled_from([1, 2, 2, 3]),
        "groups": st.sampled_from([1, 2, 3]),
        "per_group": st.integers(1, 3),
        "out_per_group": st.integers(1, 2),
        "kernel": st.lists(st.integers(1, 4), min_size=3, max_size=3),
        "stride": st.lists(st.integers(1, 3), min_size=3, max_size=3),
        "dilation": st.lists(st.integers(1, 2), min_size=3, max_size=3),
        "padding": st.one_of(
            st.sampled_from(["same", "valid"]), st.lists(st.integers(0, 2), min_size=3, max_size=3)
        ),
        "mode": st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]),
        "bias": st.booleans(),
        "batch": st.integers(1, 3),
        "size": st.lists(st.integers(5, 9), min_size=3, max_size=3),
        "channels_last": st.booleans(),
        "unbatched": st.booleans(),
    }
)


def make_conv(c: dict) -> tuple[nn.Module, torch.Tensor]:
    nd = c["nd"]
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
    padding = c["padding"]
    stride = tuple(c["stride"][:nd])
    if padding == "same":
        stride = (1,) * nd
    if not isinstance(padding, str):
        padding = tuple(padding[:nd])
        if c["mode"] != "zeros":  # reflect needs padding < input size; sizes ≥ 5 ensure it
            padding = tuple(min(p, 2) for p in padding)
    conv = conv_cls(
        c["groups"] * c["per_group"],
        c["groups"] * c["out_per_group"],
        tuple(c["kernel"][:nd]),
        stride=stride,
        padding=padding,
        dilation=tuple(c["dilation"][:nd]),
        groups=c["groups"],
        bias=c["bias"],
        padding_mode=c["mode"],
    )
    x = torch.randn(c["batch"], conv.in_channels, *c["size"][:nd]) + 0.5
    if c["channels_last"] and nd in (2, 3):
        fmt = torch.channels_last if nd == 2 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    if c["unbatched"] and c["batch"] == 1:
        x = x[0]
    return conv, x


# no deadline or speed health checks: CI machines are shared and noisy
@settings(max_examples=150, deadline=None,
          suppress_health_check=list(hypothesis.HealthCheck))
@given(conv_configs)
def test_conv_statistics_match_unfold_definition(config):
    conv, x = make_conv(config)
    try:
        out = conv(x)
    except RuntimeError:  # kernel larger than the (padded) input: not a valid conv
        return
    close(conv_input_statistic(conv, x), ref.conv_h(conv, x))
    g = torch.randn_like(out)
    close(conv_output_statistic(conv, g), ref.conv_s(conv, g))


