"""Launch census of the Triton statistics path (bench/launch_census.py), under the interpreter:
per tracked layer and pass one launch in forward and one in backward (a conv with a real patch:
two in forward), no torch op besides (no zero-fills), one factor-update launch per device.
Counts, not times."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from kernel_testing import DEVICE, INTERPRETED
from torch import nn

from adafisher import AdaFisherW

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.launch_census import LaunchCensus  # noqa: E402

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="counts the interpreter's launches")


class Mixed(nn.Module):
    """Every tracked kind: a patch conv, a 1×1 conv, a strided 1-d conv, BatchNorm (from its
    saved mean), LayerNorm and Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pointwise = nn.Conv2d(4, 3, 1)
        self.strided = nn.Conv1d(3, 3, 1, stride=2, bias=False)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pointwise(torch.relu(self.bn(self.conv(x))))  # (B, 3, 4, 4)
        y = self.strided(y.flatten(2))  # (B, 3, 8)
        return self.fc(self.norm(y)).mean(1)


PATCH_CONVS = 0  # a conv with a patch: partial rows in forward, summed by the commit


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_launches_per_layer_and_no_torch_ops():
    torch.manual_seed(0)
    model = Mixed().to(DEVICE)
    opt = AdaFisherW(model, backend="triton", factor_interval=1, lr=1e-5)
    x = torch.randn(3, 2, 4, 4, device=DEVICE)
    layers = len(opt.tracked_layers)
    assert layers == 6
    with LaunchCensus() as census:
        passes = []
        for _ in range(3):
            with census.count() as seen:
                model(x).square().mean().backward()
            passes.append(seen)
            with census.count() as step:
                opt.step()
            opt.zero_grad()
        opt.remove_hooks()
        with census.count() as bare:
            model(x).square().mean().backward()
    # the first pass allocates each layer's scratch once (one zero-fill per layer)
    assert passes[0].n_launches == 2 * layers + PATCH_CONVS
    for seen in passes[1:]:
        assert seen.n_launches == 2 * layers + PATCH_CONVS
        assert seen.torch_ops == bare.torch_ops, seen.torch_ops - bare.torch_ops
    assert dict(step.launches) == {"blend_kernel": 1, "step_kernel": 1}


def test_forward_without_backward_falls_back_to_fresh_scratch():
    """A forward whose backward never runs keeps its layer's scratch: the next forward gets
    fresh zeros (one torch op), and statistics stay those of the backpropagated passes."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3).to(DEVICE)
    ref_model = nn.Linear(5, 3).to(DEVICE)
    ref_model.load_state_dict(model.state_dict())
    opt = AdaFisherW(model, backend="triton", factor_interval=1)
    ref = AdaFisherW(ref_model, backend="torch", factor_interval=1)
    x, y = torch.randn(4, 5, device=DEVICE), torch.randn(6, 5, device=DEVICE)
    model(y)  # grad enabled, never backpropagated
    with LaunchCensus() as census, census.count() as seen:
        model(x).square().mean().backward()
    assert seen.torch_ops["zeros"] + seen.torch_ops["zero_"] + seen.torch_ops["fill_"] >= 1
    ref_model(x).square().mean().backward()
    opt.step()
    ref.step()
    for ours, theirs in zip(opt.factors(""), ref.factors("")):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
