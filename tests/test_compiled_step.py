"""The native backend's step under torch.compile: one graph, no breaks, and the same trajectory
as eager with and without statistics and with an LR scheduler changing lr."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adafisher
from adafisher import AdaFisher, AdaFisherW

pytestmark = pytest.mark.skipif(not adafisher.native_available(), reason="adafisher._C not built")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Compiled frames and dynamo's global counters must not leak into later tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 6),
        nn.LayerNorm(6), nn.Linear(6, 3), nn.Linear(3, 3, bias=False),
    )


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(2, 3, 7, 7, generator=generator)
    return model(x).square().mean()


def _eager_and_compiled(models, opts, schedulers, steps: int):
    """Trains two copies in lockstep, ``opts[0]`` eager and ``opts[1]`` through a compiled
    ``step()``, and checks after every step (schedulers moved) that their parameters agree;
    yields once per step."""
    compiled_step = torch.compile(opts[1].step, backend="aot_eager")
    for step in range(steps):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            _loss(model, step).backward()
        opts[0].step()
        compiled_step()
        for scheduler in schedulers:
            scheduler.step()
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        yield step


def test_step_is_one_graph_without_breaks():
    model = _model()
    opt = AdaFisher(model, factor_interval=2)
    assert opt.backend == "native"
    _loss(model, 0).backward()
    opt.step()  # state exists from here on
    _loss(model, 1).backward()
    explanation = torch._dynamo.explain(opt.step)()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW])
def test_compiled_step_matches_eager_with_scheduler(cls):
    models = [_model(), _model()]
    opts = [cls(m, lr=0.05, weight_decay=0.01, factor_interval=2, gammas=(0.3, 0.3))
            for m in models]
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in opts]
    for _ in _eager_and_compiled(models, opts, schedulers, steps=7):
        pass
    h0, s0 = opts[0].factors("4")
    h1, s1 = opts[1].factors("4")
    assert torch.equal(h0, h1) and torch.equal(s0, s1)
    assert not torch.equal(h0, torch.ones_like(h0))  # statistics were blended


@pytest.mark.skipif(not (torch.cuda.is_available() and adafisher.ops.native_available("cuda")),
                    reason="needs a GPU and the CUDA kernels of adafisher._C")
def test_cuda_graph_replay_matches_eager():
    """A captured step() replays with the device step counts and a tensor lr that a schedule
    changes between replays (what a stale host value would get wrong)."""
    models = [_model().cuda(), _model().cuda()]
    opts = [AdaFisherW(m, lr=0.05, weight_decay=0.01, backend="native") for m in models]
    lrs = [torch.tensor(0.05, dtype=torch.float64, device="cuda") for _ in opts]
    for opt, lr in zip(opts, lrs):
        opt.param_groups[0]["lr"] = lr
    generator = torch.Generator(device="cuda").manual_seed(0)
    for model in models:  # static gradient tensors, refilled before every step
        for p in model.parameters():
            p.grad = torch.zeros_like(p)

    def refill(step: int) -> None:
        generator.manual_seed(step)
        noise = [torch.randn(p.shape, device="cuda", generator=generator)
                 for p in models[0].parameters()]
        for model in models:
            for p, n in zip(model.parameters(), noise):
                p.grad.copy_(n)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(3):  # warm up (state, plan) on both, identically
            refill(step)
            for opt in opts:
                opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opts[1].step()
    # Capturing ran nothing: models[1] is still where models[0] is.
    for step in range(3, 23):
        refill(step)
        for lr in lrs:
            lr.fill_(0.05 * 0.9 ** step)
        opts[0].step()
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_compiled_step_compiles_a_constant_number_of_times():
    """Neither the statistics schedule nor an lr schedule recompiles the step: the graphs of
    the first steps (state creation, the step count turning symbolic) serve every later step,
    with and without statistics, while the lr changes every step; the trajectory is eager's."""
    models = [_model(), _model()]
    opts = [AdaFisherW(m, lr=0.05, weight_decay=0.01, factor_interval=3, gammas=(0.3, 0.3))
            for m in models]
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=40) for o in opts]
    counts = [torch._dynamo.utils.counters["stats"]["unique_graphs"]
              for _ in _eager_and_compiled(models, opts, schedulers, steps=24)]
    assert counts[-1] == counts[5] <= 4, counts  # nothing compiled after the first steps
    assert opts[1]._factor_step == 24
    h0, s0 = opts[0].factors("4")
    h1, s1 = opts[1].factors("4")
    assert torch.equal(h0, h1) and torch.equal(s0, s1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_compiled_step_refuses_a_bad_float_lr(bad):
    """A traced step checks its symbolic lr (torch._check: RuntimeError; where dynamo falls
    back to running the frame eagerly, the eager check's ValueError) and changes nothing."""
    model = _model()
    opt = AdaFisher(model, lr=0.05, factor_interval=2)
    compiled_step = torch.compile(opt.step, backend="aot_eager")
    for step in range(3):
        opt.zero_grad()
        _loss(model, step).backward()
        compiled_step()
        opt.param_groups[0]["lr"] *= 0.5
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["lr"] = bad
    with pytest.raises((RuntimeError, ValueError), match="lr must be"):
        compiled_step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
