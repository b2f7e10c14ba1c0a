"""The native step's host path: its Python work does not grow with the number of parameters,
and torch.optim's step wrapper (profiler range, step hooks) still does its job when it is
needed."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import adafisher
from adafisher import AdaFisher

pytestmark = pytest.mark.skipif(not adafisher.native_available(), reason="adafisher._C not built")


def _trained(n_layers: int, **kwargs) -> tuple[nn.Module, AdaFisher]:
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(3, 3) for _ in range(n_layers)))
    opt = AdaFisher(model, backend="native", **kwargs)
    model(torch.randn(2, 3)).square().sum().backward()
    opt.step()  # a statistics step; state and plans exist from here on
    return model, opt


def _python_calls(fn) -> int:
    """Python-level calls (functions and builtins called from Python code) while ``fn`` runs."""
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def test_steady_state_python_work_does_not_grow_with_parameters():
    counts = []
    for n_layers in (4, 8, 16):
        model, opt = _trained(n_layers)
        for p in model.parameters():  # fresh gradient tensors, as after zero_grad(None)
            p.grad = torch.randn_like(p)
        opt.step()
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        counts.append(_python_calls(opt.step))
    assert counts[0] == counts[1] == counts[2], counts


def test_step_hooks_and_profiler_range_still_run():
    model, opt = _trained(2)
    seen = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("pre"))
    post = opt.register_step_post_hook(lambda o, args, kwargs: seen.append("post"))
    glob = register_optimizer_step_post_hook(
        lambda o, args, kwargs: seen.append("global"))
    try:
        opt.step()
    finally:
        pre.remove()
        post.remove()
        glob.remove()
    assert seen == ["pre", "post", "global"]
    opt.step()  # no hooks: the direct path
    assert seen == ["pre", "post", "global"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert any(e.name == "Optimizer.step#AdaFisher.step" for e in prof.events())
