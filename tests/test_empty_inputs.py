"""Empty batches and zero-size layers, on every backend (SPEC §4: a pass with zero samples adds
nothing). The Triton backend runs under the interpreter on CPU (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adafisher import AdaFisherW

BACKENDS = ("torch", "triton")

# (layer, input shape with a batch of 0)
EMPTY_BATCHES = {
    "linear": (lambda: nn.Linear(8, 3), (0, 8)),
    "linear_3d_input": (lambda: nn.Linear(8, 3), (2, 0, 8)),
    "conv1d": (lambda: nn.Conv1d(2, 3, 3), (0, 2, 5)),
    "conv2d": (lambda: nn.Conv2d(2, 3, 3, padding=1), (0, 2, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 3), (0, 2, 4, 4, 4)),
    "batchnorm1d": (lambda: nn.BatchNorm1d(4), (0, 4)),
    "batchnorm2d": (lambda: nn.BatchNorm2d(4), (0, 4, 3, 3)),
    "layernorm": (lambda: nn.LayerNorm(4), (0, 4)),
}


def _pending(opt) -> tuple[torch.Tensor, torch.Tensor]:
    (buffers,) = opt._buffers.values()
    return buffers.pending.clone(), buffers.pending_count.clone()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(EMPTY_BATCHES))
def test_an_empty_pass_commits_nothing(backend, case):
    make, shape = EMPTY_BATCHES[case]
    torch.manual_seed(0)
    layer = make()
    opt = AdaFisherW(layer, backend=backend, factor_interval=1)
    layer(torch.randn(*shape)).sum().backward()
    pending, count = _pending(opt)
    assert count.sum() == 0 and pending.abs().sum() == 0
    before = [p.detach().clone() for p in layer.parameters()]
    opt.step()  # zero gradients, no factors: the parameters stay put
    for p, old in zip(layer.parameters(), before):
        torch.testing.assert_close(p, old, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_micro_batch_leaves_the_trajectory_unchanged(backend):
    """Gradient accumulation with an empty micro-batch (an uneven last shard) gives exactly the
    factors and parameters of the same run without it."""

    def run(with_empty: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(),
                              nn.LayerNorm(27), nn.Linear(27, 2))
        opt = AdaFisherW(model, backend=backend, factor_interval=1, lr=1e-4)
        gen = torch.Generator().manual_seed(1)
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(4, 2, 5, 5, generator=gen)).square().mean().backward()
            if with_empty:
                model(torch.randn(0, 2, 5, 5)).square().sum().backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()], _factors(opt)

    params, factors = run(False)
    params_empty, factors_empty = run(True)
    for a, b in zip(params + factors, params_empty + factors_empty):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _factors(opt) -> list[torch.Tensor]:
    return [t for name in opt.tracked_layers for t in opt.factors(name)]


# Zero-size factored layers next to a normal one: (module, input shape)
ZERO_SIZE = {
    "linear_no_outputs": (lambda: nn.Linear(16, 0), (3, 16)),
    "linear_no_inputs": (lambda: nn.Linear(0, 4), (3, 0)),
    "conv_no_inputs": (lambda: nn.Conv2d(0, 3, 3), (2, 0, 5, 5)),
}


class WithZeroSize(nn.Module):
    def __init__(self, make) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 2)
        self.empty = make()

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.empty(z).sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(ZERO_SIZE))
def test_zero_size_layers_train_like_adam(backend, case):
    """The hooks survive zero-size layers and every parameter moves as far as it can: the
    zero-size ones stay empty, the others go down the loss as with ``torch.optim.Adam``."""
    make, shape = ZERO_SIZE[case]
    torch.manual_seed(0)
    model = WithZeroSize(make)
    # lr / damping is the effective SGD step once factors exist (SPEC §3)
    opt = AdaFisherW(model, backend=backend, factor_interval=1, lr=1e-5)
    adam_model = WithZeroSize(make)
    adam_model.load_state_dict(model.state_dict())
    adam = torch.optim.Adam(adam_model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    x, z = torch.randn(6, 5, generator=gen), torch.randn(*shape, generator=gen)
    losses = {}
    for name, m, o in (("adafisher", model, opt), ("adam", adam_model, adam)):
        history = []
        for _ in range(4):
            o.zero_grad()
            loss = m(x, z).square().mean()
            loss.backward()
            o.step()
            history.append(loss.item())
        losses[name] = history
    assert losses["adafisher"][-1] < losses["adafisher"][0]
    assert losses["adam"][-1] < losses["adam"][0]
    for p in model.parameters():
        assert torch.isfinite(p).all()
    assert "empty" in opt.tracked_layers


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_without_output_channels_fails_as_in_torch(backend):
    """``Conv2d(2, 0, 3)`` cannot run forward in torch itself (with or without an optimizer);
    the optimizer accepts the model, and the error is torch's own."""
    layer = nn.Conv2d(2, 0, 3)
    x = torch.randn(2, 2, 5, 5)
    with pytest.raises(RuntimeError) as plain:
        layer(x)
    opt = AdaFisherW(layer, backend=backend, factor_interval=1)
    with pytest.raises(RuntimeError) as tracked:
        layer(x)
    assert str(tracked.value) == str(plain.value)
    opt.step()


@pytest.mark.parametrize("case", ["linear_no_outputs", "linear_no_inputs"])
def test_zero_size_layer_factors_agree_across_backends(case):
    """The Triton launch of a zero-width reduction still writes the bias entry and commits the
    pass (its grid keeps one program per empty extent)."""
    make, shape = ZERO_SIZE[case]
    factors = {}
    for backend in BACKENDS:
        torch.manual_seed(0)
        model = WithZeroSize(make)
        opt = AdaFisherW(model, backend=backend, factor_interval=1, lr=1e-5)
        gen = torch.Generator().manual_seed(1)
        x, z = torch.randn(6, 5, generator=gen), torch.randn(*shape, generator=gen)
        model(x, z).square().mean().backward()
        opt.step()
        factors[backend] = opt.factors("empty")
        (buffers,) = opt._buffers.values()
        assert bool(buffers.initialized().all())
    for a, b in zip(factors["torch"], factors["triton"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
