"""Launch census of the Triton statistics path (bench/launch_census.py): per tracked layer and
pass, every kind, one launch in forward and one in backward, no torch op besides (no
zero-fills), one factor-update launch per device. Counted by instrumenting the launcher, per
layer hook call: under the interpreter (small models, kernels run) and on the meta device
(ResNet-50 and a GPT-style model at real sizes, launches planned and recorded). Counts, not
times."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from kernel_testing import DEVICE, INTERPRETED
from torch import nn

from adafisher import AdaFisherW

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench import launch_census  # noqa: E402
from bench.launch_census import LaunchCensus  # noqa: E402

interpreter_only = pytest.mark.skipif(not INTERPRETED, reason="counts the interpreter's launches")


class Mixed(nn.Module):
    """Every tracked kind: a patch conv, a grouped strided conv, a 1×1 conv, a strided 2-d
    1×1 conv (NCHW: no single strided view), a strided 1-d conv, BatchNorm (from its saved
    mean), LayerNorm and Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(4)
        self.pointwise = nn.Conv2d(4, 3, 1)
        self.down = nn.Conv2d(4, 4, 1, stride=2)
        self.strided = nn.Conv1d(3, 3, 1, stride=2, bias=False)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))  # (B, 4, 4, 4)
        y = self.pointwise(y + self.grouped(y).repeat_interleave(2, -1).repeat_interleave(2, -2)
                           + self.down(y).repeat_interleave(2, -1).repeat_interleave(2, -2))
        y = self.strided(y.flatten(2))  # (B, 3, 8)
        return self.fc(self.norm(y)).mean(1)


def assert_bound(census) -> None:
    """At most one launch and no torch op per layer hook call, forward and backward."""
    for kind, row in census.per_kind().items():
        for phase in ("forward", "backward"):
            assert row[f"most_{phase}_launches"] <= 1, (kind, row)
            assert row[f"most_{phase}_torch_ops"] == 0, (kind, row)
            assert row[f"{phase}_launches"] <= row[f"{phase}_calls"], (kind, row)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@interpreter_only
def test_two_launches_per_layer_and_no_torch_ops():
    torch.manual_seed(0)
    model = Mixed().to(DEVICE)
    opt = AdaFisherW(model, backend="triton", factor_interval=1, lr=1e-5)
    x = torch.randn(3, 2, 4, 4, device=DEVICE)
    layers = len(opt.tracked_layers)
    assert layers == 8
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
    assert passes[0].n_launches == 2 * layers
    for seen in passes[1:]:
        assert seen.n_launches == 2 * layers
        assert seen.torch_ops == bare.torch_ops, seen.torch_ops - bare.torch_ops
        assert_bound(seen)
        assert {kind: (row["forward_calls"], row["backward_calls"])
                for kind, row in seen.per_kind().items()} == {
            "conv": (5, 5), "batchnorm": (1, 1), "layernorm": (1, 1), "linear": (1, 1)}
    assert dict(step.launches) == {"blend_kernel": 1, "step_kernel": 1}


@interpreter_only
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


@pytest.mark.parametrize("model,batch,layers,by_kind,step_launches", [
    # step launches: one per 16 parameters (the step kernel's slots); 161 and 148 parameters
    ("resnet50", 256, 107, {"conv": 53, "batchnorm": 53, "linear": 1}, 11),
    ("gpt", 8, 74, {"layernorm": 25, "linear": 49}, 10),
])
def test_real_models_on_the_meta_device(model, batch, layers, by_kind, step_launches):
    """ResNet-50 (batch 256, 224², bf16, channels_last) and a GPT-2-small-shaped model
    (batch 8, context 1024, bf16), launches planned for an H100/H200 and recorded: a steady
    pass launches exactly 2 per tracked layer and adds no torch op; a step launches the
    factor update once and the step once per 16 parameters."""
    report = launch_census.measure(model, batch, torch.device("meta"), torch.bfloat16,
                                   passes=1, small=False)
    assert report["tracked_layers"] == layers
    steady = report["pass"]
    assert steady["launches"] == 2 * layers
    assert steady["torch_ops_added"] == 0, steady["extra_torch_ops"]
    per_kind = steady["per_kind"]
    assert {kind: row["forward_calls"] for kind, row in per_kind.items()} == by_kind
    for kind, row in per_kind.items():
        for phase in ("forward", "backward"):
            assert row[f"{phase}_calls"] == by_kind[kind]
            assert row[f"most_{phase}_launches"] == 1 and row[f"{phase}_launches"] == by_kind[
                kind], (kind, row)
            assert row[f"most_{phase}_torch_ops"] == 0, (kind, row)
    assert report["step"]["by_kernel"] == {"blend_kernel": 1, "step_kernel": step_launches}
    # meta planning is undone: the Triton backend refuses meta tensors again
    from adafisher.backends import triton_backend  # noqa: PLC0415

    assert not triton_backend._runs_on(torch.device("meta"), INTERPRETED)
