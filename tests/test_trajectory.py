"""Whole-optimizer trajectories against the literal float64 SPEC implementation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adafisher import AdaFisher, AdaFisherW

from reference_optimizer import ReferenceAdaFisher


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(6, 6, (3, 2), groups=3, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 3 * 3, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)
        self.free = nn.Parameter(torch.randn(4) * 0.1)  # outside any layer: F = 1

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = self.bn(self.grouped(x))
        x = torch.tanh(self.fc(torch.relu(x).flatten(1)))
        return self.head(self.ln(x)) + self.free


def assert_params_close(model, twin):
    """Relative to each tensor's scale: factors are fp32, so ~1e-7 relative noise is expected."""
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5 * q.abs().max().item(), msg=name)


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(5, 3, 9, 8, generator=g, dtype=torch.float64),
         torch.randint(0, 4, (5,), generator=g))
        for _ in range(n)
    ]


@pytest.mark.parametrize("decoupled", [False, True], ids=["AdaFisher", "AdaFisherW"])
@pytest.mark.parametrize("interval", [1, 3])
@pytest.mark.parametrize("gammas", [(0.92, 0.008), (0.05, 0.05)], ids=["default", "ema"])
def test_trajectory_matches_literal_spec(decoupled, interval, gammas):
    torch.manual_seed(1)
    model = SmallNet().double()
    twin = copy.deepcopy(model)
    hp = dict(lr=3e-3, beta=0.9, damping=1e-3, gammas=gammas, factor_interval=interval,
              weight_decay=0.05)
    opt = (AdaFisherW if decoupled else AdaFisher)(model, **hp)
    reference = ReferenceAdaFisher(twin, decoupled=decoupled, **hp)
    for x, y in batches(7):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        twin.zero_grad()
        nn.functional.cross_entropy(twin(x), y).backward()
        reference.after_backward()
        reference.step()
    assert_params_close(model, twin)
    for name in opt.tracked_layers:
        H, S = opt.factors(name)
        torch.testing.assert_close(H.double(), reference.H[name], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(S.double(), reference.S[name], rtol=1e-5, atol=1e-9)


def test_gradient_accumulation_averages_then_blends_once():
    torch.manual_seed(2)
    model = SmallNet().double()
    twin = copy.deepcopy(model)
    hp = dict(lr=1e-3, beta=0.9, damping=1e-3, gammas=(0.3, 0.3), factor_interval=1,
              weight_decay=0.0)
    opt = AdaFisher(model, **hp)
    reference = ReferenceAdaFisher(twin, decoupled=False, **hp)
    data = batches(6, seed=3)
    for i in range(0, 6, 3):  # three backward passes per step
        opt.zero_grad()
        twin.zero_grad()
        for x, y in data[i : i + 3]:
            nn.functional.cross_entropy(model(x), y).backward()
            nn.functional.cross_entropy(twin(x), y).backward()
            reference.after_backward()
        opt.step()
        reference.step()
    assert_params_close(model, twin)
