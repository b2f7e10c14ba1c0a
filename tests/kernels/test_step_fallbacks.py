"""The Triton backend's per-parameter torch path is counted and visible, and one misaligned
parameter gets its own step launch instead of turning off vector loads for all."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from kernel_testing import DEVICE, INTERPRETED
from torch import nn

from adafisher import AdaFisherW
from adafisher.kernels import fused_step

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.launch_census import LaunchCensus  # noqa: E402

pytestmark = pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                                reason="needs Triton")


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3)).to(DEVICE)
    return model


def _run(model: nn.Module, backend: str, steps: int = 2):
    opt = AdaFisherW(model, backend=backend, factor_interval=1, lr=1e-5)
    x = torch.randn(6, 5, device=DEVICE, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return opt


def test_slow_path_parameters_are_listed_and_warned_once():
    model = _model()
    # a transposed weight: neither row-major nor channels_last
    model[0].weight = nn.Parameter(model[0].weight.detach().t().contiguous().t())
    reference = _model()
    reference[0].weight = nn.Parameter(model[0].weight.detach().clone())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = _run(model, "triton", steps=3)
    slow = [w for w in caught if "per-parameter torch path" in str(w.message)]
    assert len(slow) == 1
    assert opt.slow_path_parameters == {"0.weight": "layout neither row-major nor channels_last"}
    ref = _run(reference, "torch", steps=3)
    assert ref.slow_path_parameters == {}
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_fused_parameters_are_not_listed():
    assert _run(_model(), "triton").slow_path_parameters == {}


def test_one_misaligned_parameter_gets_its_own_launch():
    model = _model()
    base = torch.zeros(1 + model[1].bias.numel(), device=DEVICE)
    base[1:] = model[1].bias.detach()
    model[1].bias = nn.Parameter(base[1:])  # 4 bytes past an aligned allocation
    assert model[1].bias.data_ptr() % 16 != 0
    reference = _model()
    opt = AdaFisherW(model, backend="triton", factor_interval=1, lr=1e-5)
    x = torch.randn(6, 5, device=DEVICE)
    model(x).square().mean().backward()
    with LaunchCensus() as census, census.count() as seen:
        opt.step()
    # the slot tensors (p, g, m of every slot) of each step launch: all 16-byte aligned or not
    steps = [all(a.endswith(":16") for a in key[0][:3 * fused_step.SLOTS])
             for (name, key), n in seen.keys.items() for _ in range(n) if name == "step_kernel"]
    assert sorted(steps) == [False, True]
    ref = AdaFisherW(reference, backend="torch", factor_interval=1, lr=1e-5)
    reference(x).square().mean().backward()
    ref.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert opt.slow_path_parameters == {}
