"""Deterministic mode: under ``torch.use_deterministic_algorithms(True)`` the statistics take a
fixed summation order (one writer per output element, no racing float atomics).

The interpreter runs programs one after another, so it cannot show a race; the launch plan
is checked on the meta device instead (GPU-sized grids, launches recorded and not run), and
the values under the interpreter (two runs bitwise equal, agreement with the torch backend)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch
from kernel_testing import DEVICE, INTERPRETED
from torch import nn

from adafisher import AdaFisherW
from adafisher.backends import triton_statistics
from adafisher.layers import layer_kind

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.launch_census import LaunchCensus  # noqa: E402


@contextlib.contextmanager
def deterministic(enabled: bool = True):
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def _grids(enabled: bool) -> dict[str, list[tuple[int, int, int]]]:
    """Grids of the forward and backward launches of a Linear and a conv at GPU sizes."""
    meta = torch.device("meta")
    fc, conv = nn.Linear(512, 64), nn.Conv2d(64, 64, 3, padding=1)
    cases = [(fc, torch.empty(8192, 512, device=meta), torch.empty(8192, 64, device=meta)),
             (conv, torch.empty(64, 64, 56, 56, device=meta),
              torch.empty(64, 64, 56, 56, device=meta))]
    grids: dict[str, list] = {}
    with deterministic(enabled), LaunchCensus(run=False) as census, census.count() as seen:
        for module, x, g in cases:
            from adafisher.factors import FactorBuffers  # noqa: PLC0415
            from adafisher.layers import factor_sizes  # noqa: PLC0415

            kind = layer_kind(module)
            buffers = FactorBuffers(meta)
            slot = buffers.add_layer("l", kind, *factor_sizes(kind, module))
            h = triton_statistics.input_statistic(kind, module, x)
            triton_statistics.commit_pass(buffers, slot, module, h, g, x.shape[0])
    for name, grid, _ in seen.grids:
        grids.setdefault(name, []).append(grid)
    return grids


def test_deterministic_mode_plans_one_writer_per_element():
    before = torch.are_deterministic_algorithms_enabled()
    fast, fixed = _grids(False), _grids(True)
    assert torch.are_deterministic_algorithms_enabled() == before
    # fast: reductions spread over samples/positions with atomics; fixed: whole channels
    assert any(g[1] * g[2] > 1 for g in fast["channel_reduce_kernel"])
    assert all(g[1:] == (1, 1) for g in fixed["channel_reduce_kernel"])
    # a conv's Ĥ writes partial rows (one writer each, summed in order by the commit): the
    # same spread-out plan in both modes
    assert fast["patch_partials_kernel"] == fixed["patch_partials_kernel"]
    assert fast["patch_partials_kernel"][0][2] > 1


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, groups=2)
        self.bn = nn.BatchNorm2d(4)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.grouped(torch.relu(self.conv(x)))).flatten(1)
        return self.fc(self.norm(y))


def _train(backend: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = Net().to(DEVICE)
    opt = AdaFisherW(model, backend=backend, factor_interval=1, lr=1e-5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(5, 2, 4, 4, generator=gen).to(DEVICE)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    factors = [t for name in opt.tracked_layers for t in opt.factors(name)]
    return [p.detach().clone() for p in model.parameters()] + factors


@pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(), reason="needs Triton")
def test_two_runs_are_bitwise_equal_and_agree_with_torch():
    with deterministic():
        first, second = _train("triton"), _train("triton")
        reference = _train("torch")
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for a, b in zip(first, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
