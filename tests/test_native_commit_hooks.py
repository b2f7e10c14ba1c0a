"""The native backend's C++ commit hooks (``csrc/commit_hooks.cpp``) against the Python hooks.

On CPU the native backend commits each pass from a C++ autograd hook instead of a Python one.
Both must commit the same bits, in the same passes: every layer kind and layout, and every way
a backward can (not) reach a layer's parameters.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import adafisher
from adafisher import AdaFisher, ops

pytestmark = pytest.mark.skipif(not adafisher.native_available(),
                                reason="adafisher._C is not built")


class InplaceAfterLayers(nn.Module):
    """In-place ops right after tracked layers (the hook must see the pre-in-place gradient)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        out = self.conv(x)
        out += x
        out = nn.functional.relu(self.bn(out), inplace=True)
        out = self.fc(out.mean((2, 3)))
        return out.mul_(2.0)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.attention(x, x, x)[0])


def _case(name: str) -> tuple[nn.Module, tuple[int, ...], torch.memory_format]:
    fmt = torch.contiguous_format
    if name == "linear-3d":
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3, bias=False))
        return model, (4, 3, 5), fmt
    if name == "conv1d-stride-dilation":
        return nn.Sequential(nn.Conv1d(4, 6, 3, stride=2, dilation=2, padding=3), nn.ReLU(),
                             nn.Conv1d(6, 2, 1)), (3, 4, 11), fmt
    if name == "conv2d-groups-channels-last":
        return nn.Sequential(nn.Conv2d(4, 6, (3, 2), padding=(1, 0), groups=2), nn.BatchNorm2d(6),
                             nn.ReLU()), (3, 4, 5, 7), torch.channels_last
    if name == "conv3d":
        return nn.Sequential(nn.Conv3d(2, 3, 2, padding=1, bias=False), nn.BatchNorm3d(3)), \
            (2, 2, 3, 4, 3), fmt
    if name == "conv2d-unbatched":
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)), (3, 5, 6), fmt
    if name == "batchnorm-eval":  # no saved batch mean: Ĥ from x in the forward
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
        model[1].eval()
        return model, (3, 2, 5, 5), fmt
    if name == "batchnorm-frozen-bias":  # no bias gradient: Ŝ from the output gradient
        model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
        model[1].bias.requires_grad_(False)
        return model, (5, 4), fmt
    if name == "layernorm-no-bias":
        return nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6, bias=False), nn.Linear(6, 2)), \
            (4, 6), fmt
    if name == "inplace-after-layers":
        return InplaceAfterLayers(), (2, 3, 4, 4), fmt
    if name == "attention-out-proj":
        return Attention(), (2, 5, 8), fmt
    if name == "float64":
        return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(),
                             nn.Linear(27, 2)).double(), (3, 2, 5, 5), fmt
    raise ValueError(name)


CASES = ["linear-3d", "conv1d-stride-dilation", "conv2d-groups-channels-last", "conv3d",
         "conv2d-unbatched", "batchnorm-eval", "batchnorm-frozen-bias", "layernorm-no-bias",
         "inplace-after-layers", "attention-out-proj", "float64"]


def _backward(model: nn.Module, x: torch.Tensor, how: str) -> None:
    loss = model(x).square().sum()
    last_params = list(model.parameters())[-1:]
    if how == "backward":
        loss.backward()
    elif how == "retain-graph-twice":  # two backwards through one graph: two commits
        loss.backward(retain_graph=True)
        loss.backward()
    elif how == "create-graph":  # hooks run in grad mode
        with warnings.catch_warnings():  # (the parameter ↔ gradient cycle it warns of is cut)
            warnings.simplefilter("ignore", UserWarning)
            loss.backward(create_graph=True)
        model.zero_grad(set_to_none=True)
    elif how == "autograd-grad-inputs":  # accumulates into no parameter: no commit
        torch.autograd.grad(loss, x)
    elif how == "backward-inputs-x":
        loss.backward(inputs=[x])
    elif how == "backward-inputs-last-layer":  # only the layers of that parameter commit
        loss.backward(inputs=last_params)
    elif how == "autograd-grad-params":  # a captured parameter counts as consumed (as in Python)
        params = [p for p in model.parameters() if p.requires_grad]
        torch.autograd.grad(loss, params, allow_unused=True)
    else:
        raise ValueError(how)


HOWS = ["backward", "retain-graph-twice", "create-graph", "autograd-grad-inputs",
        "backward-inputs-x", "backward-inputs-last-layer", "autograd-grad-params"]


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("case", CASES)
def test_native_hooks_commit_the_bits_the_python_hooks_commit(case, how):
    torch.manual_seed(0)
    model, shape, fmt = _case(case)
    twin = copy.deepcopy(model)
    fast = AdaFisher(model, factor_interval=1, backend="native")
    slow = AdaFisher(twin, factor_interval=1, backend="native")
    assert fast._backend._register_commit_hook is not None
    slow._backend._register_commit_hook = None  # the Python hooks
    dtype = next(model.parameters()).dtype
    x = torch.randn(shape, dtype=dtype)
    if x.dim() == 4:
        x = x.contiguous(memory_format=fmt)
    for opt in (fast, slow):
        for buffers in opt._buffers.values():  # poisoned: commits must add into what is there
            buffers.pending.fill_(0.25)
    for net in (model, twin):
        _backward(net, x.clone().requires_grad_(), how)
    for ours, theirs in zip(fast._buffers.values(), slow._buffers.values(), strict=True):
        assert torch.equal(ours.pending_count, theirs.pending_count)
        assert torch.equal(ours.pending, theirs.pending)
        committed = int(ours.pending_count.sum())
        if how in ("autograd-grad-inputs", "backward-inputs-x"):
            assert committed == 0
        elif how == "retain-graph-twice":
            assert committed == 2 * len(ours.slots)
        elif how != "backward-inputs-last-layer":
            assert committed == len(ours.slots)


def test_the_backward_runs_no_python_statistics_code(monkeypatch):
    """The fast path is taken: a training step on CPU never calls the Python commit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(36, 5), nn.LayerNorm(5))
    opt = AdaFisher(model, factor_interval=1)
    assert opt._backend.name == "native"

    def refuse(*args, **kwargs):
        raise AssertionError("commit_pass ran in Python")

    monkeypatch.setattr(opt._backend, "commit_pass", refuse)
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    buffers = next(iter(opt._buffers.values()))
    assert buffers.pending_count.tolist() == [1.0, 1.0, 1.0, 1.0]
    opt.step()


def test_a_hooked_pass_that_never_commits_names_no_unfed_layer():
    """A native hook is registered in the forward; a pass whose backward reaches no parameter
    commits nothing, and the step does not take the zero counts for unfed layers."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = AdaFisher(model, factor_interval=1)
    x = torch.randn(5, 3, requires_grad=True)
    model(x).sum().backward(inputs=[x])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert all(b.pending_count.sum() == 0 for b in opt._buffers.values())


def test_register_commit_hook_refuses_bad_arguments():
    register = ops.native_function("register_commit_hook")
    out = nn.Linear(2, 3)(torch.randn(4, 2))
    pending, counts, h_hat = torch.zeros(7), torch.zeros(1), torch.ones(3)
    common = (0, 0, 3, 1, 2, False, 0.25, 4, None)
    with pytest.raises(TypeError, match="pending must be a Tensor"):
        register(out, False, [0.0], counts, h_hat, None, 0.0, 0.0, *common)
    with pytest.raises(TypeError, match="h_hat must be a Tensor or None"):
        register(out, False, pending, counts, 1.0, None, 0.0, 0.0, *common)
    with pytest.raises(ValueError, match="exactly one of h_hat and h_source"):
        register(out, False, pending, counts, None, None, 0.0, 0.0, *common)
    with pytest.raises(ValueError, match="exactly one of h_hat and h_source"):
        register(out, False, pending, counts, h_hat, h_hat, 0.0, 0.0, *common)
    for on_node in (False, True):  # nothing to hook: False, the Python hooks take the pass
        assert register(out.detach(), on_node, pending, counts, h_hat, None, 0.0, 0.0,
                        *common) is False
    assert register(out, False, pending, counts, h_hat, None, 0.0, 0.0, *common) is True
    assert pending.count_nonzero() == 0 and counts.sum() == 0  # commits only in the backward
    out.sum().backward()
    assert counts.tolist() == [1.0]
    torch.testing.assert_close(pending[:3], h_hat)
    torch.testing.assert_close(pending[3:6], torch.full((3,), 0.25 * 4))  # Σ 1² over 4 rows


def test_an_older_build_without_the_hook_falls_back_to_the_python_hooks():
    assert ops.native_function("no_such_function") is None
    model = nn.Linear(3, 2)
    opt = AdaFisher(model, factor_interval=1)
    opt._backend._register_commit_hook = None
    model(torch.randn(4, 3)).sum().backward()
    assert next(iter(opt._buffers.values())).pending_count.tolist() == [1.0]


def test_compiled_autograd_gets_the_python_hooks_or_a_clear_error():
    """Compiled autograd traces Python hooks only: a forward run with it on takes them (and
    commits as usual); a graph hooked natively refuses a compiled backward, saying why."""
    compiled_autograd = pytest.importorskip("torch._dynamo.compiled_autograd")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(27, 4))
    twin = copy.deepcopy(model)
    opt = AdaFisher(model, factor_interval=1)
    twin_opt = AdaFisher(twin, factor_interval=1, backend="torch")
    x = torch.randn(3, 2, 5, 5)
    with compiled_autograd._enable(torch.compile(backend="eager")):
        model(x).square().sum().backward()
    twin(x).square().sum().backward()
    ours, theirs = next(iter(opt._buffers.values())), next(iter(twin_opt._buffers.values()))
    assert ours.pending_count.tolist() == [1.0, 1.0, 1.0]
    torch.testing.assert_close(ours.pending, theirs.pending, rtol=1e-5, atol=0)
    loss = model(x).square().sum()  # hooked natively: compiled autograd is off here
    with pytest.raises(NotImplementedError, match="cannot run under compiled autograd"):
        with compiled_autograd._enable(torch.compile(backend="eager")):
            loss.backward()


def test_compiled_autograd_configured_before_the_forward_gets_the_python_hooks(monkeypatch):
    dynamo = pytest.importorskip("torch._dynamo")
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    opt = AdaFisher(model, factor_interval=1)

    def refuse(*args, **kwargs):
        raise AssertionError("native hooks registered while compiled autograd is configured")

    monkeypatch.setattr(opt._backend, "hook_commit", refuse)
    with dynamo.config.patch(compiled_autograd=True):
        model(torch.randn(5, 3)).sum().backward()
    assert next(iter(opt._buffers.values())).pending_count.tolist() == [1.0, 1.0]


def test_native_hooks_under_autocast_commit_the_python_hooks_bits():
    """bf16 activations and gradients from a CPU autocast forward: the same fp32 sums."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(36, 5), nn.LayerNorm(5))
    twin = copy.deepcopy(model)
    fast = AdaFisher(model, factor_interval=1, backend="native")
    slow = AdaFisher(twin, factor_interval=1, backend="native")
    slow._backend._register_commit_hook = None
    x = torch.randn(2, 3, 5, 5)
    for net in (model, twin):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = net(x).float().square().sum()
        loss.backward()
    ours, theirs = next(iter(fast._buffers.values())), next(iter(slow._buffers.values()))
    assert ours.pending_count.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert torch.equal(ours.pending, theirs.pending)
