"""AdaFisher with ``backend="triton"`` against ``backend="torch"`` on a small model.

On CPU this runs every kernel under the Triton interpreter (slow per launch), so the model is
tiny: a conv, BatchNorm, LayerNorm and Linear layer plus one untracked parameter. (The conv
feeds BatchNorm through a ReLU: a conv bias right before BatchNorm has a zero gradient, whose
rounding noise no relative comparison could check.)
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from kernel_testing import DEVICE, INTERPRETED, rel_err
from torch import nn

import adafisher
from adafisher import AdaFisher, AdaFisherW
from adafisher.backends import resolve_backend, triton_backend


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.bn = nn.BatchNorm2d(3)
        self.norm = nn.LayerNorm(12)
        self.fc = nn.Linear(12, 3)
        self.scale = nn.Parameter(torch.full((3,), 1.5))  # untracked: F = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(torch.relu(self.conv(x))).flatten(1)
        return self.fc(self.norm(y)) * self.scale


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(steps: int, batch: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 2, 4, 4, generator=gen).to(DEVICE),
             torch.randint(0, 3, (batch,), generator=gen).to(DEVICE)) for _ in range(steps)]


def _train(backend: str, steps: int, *, cls=AdaFisherW, dtype=torch.float32, autocast=None,
           accumulate: int = 1, skip_scale_every: int = 0, poison_pass: int = -1,
           factor_interval: int = 1, **kwargs):
    torch.manual_seed(0)
    model = Tiny().to(device=DEVICE, dtype=dtype)
    # lr/damping sets the effective SGD step (SPEC §3): 0.3 keeps this model stable, so the
    # two trajectories stay comparable instead of amplifying rounding differences.
    opt = cls(model, backend=backend, factor_interval=factor_interval, lr=3e-4, **kwargs)
    assert opt.backend == backend
    passes = 0
    for step, (x, y) in enumerate(_data(steps * accumulate)[::accumulate]):
        opt.zero_grad()
        for micro in range(accumulate):
            xb = (x + micro).to(dtype)
            poisoned = passes == poison_pass
            if poisoned:  # finite, but its squares overflow fp32: the statistics turn inf
                xb = xb * 1e25
            passes += 1
            ctx = (torch.autocast(DEVICE.type, dtype=autocast) if autocast
                   else contextlib.nullcontext())
            with ctx:
                loss = nn.functional.cross_entropy(model(xb).float(), y)
            loss.backward()
            if poisoned:  # keep its gradients out of the update; its statistics stay pending
                for p in model.parameters():
                    p.grad.zero_()
        if skip_scale_every and step % skip_scale_every == 1:
            model.scale.grad = None  # this parameter skips the step: its t lags behind
        opt.step()
    return model, opt


def _compare(a, b, tol: float) -> None:
    (model_a, opt_a), (model_b, opt_b) = a, b
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        assert rel_err(p.detach(), q.detach()) < tol, name
        state_a, state_b = opt_a.state[p], opt_b.state[q]
        assert rel_err(state_a["exp_avg"], state_b["exp_avg"]) < max(tol, 1e-6), name
        assert state_a["step"] == state_b["step"]
    assert opt_a.nonfinite_statistics == opt_b.nonfinite_statistics
    for name in opt_a.tracked_layers:
        h_a, s_a = opt_a.factors(name)
        h_b, s_b = opt_b.factors(name)
        assert rel_err(h_a, h_b) < 1e-4 and rel_err(s_a, s_b) < 1e-4, name


# -------------------------------------------------------------------------------- selection
def test_backend_selection() -> None:
    model = Tiny().to(DEVICE)
    assert AdaFisher(model, backend="triton").backend == "triton"
    expected_auto = ("native" if adafisher.native_available() else "torch") if INTERPRETED \
        else "triton"
    assert AdaFisher(model, backend="auto").backend == expected_auto
    assert triton_backend.usable_on({torch.device("cpu")}) is False
    assert triton_backend.usable_on(set()) is False


def test_unusable_devices_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_backend, "_interpreted", lambda: False)
    with pytest.raises(ValueError, match="CUDA"):
        resolve_backend("triton", {torch.device("cpu")})
    monkeypatch.setattr(triton_backend, "_interpreted", lambda: True)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_backend("triton", {torch.device("cuda")})
    monkeypatch.setattr(triton_backend, "_import_error", lambda: "No module named 'triton'")
    with pytest.raises(ValueError, match="needs Triton"):
        resolve_backend("triton", {torch.device("cpu")})
    assert triton_backend.usable_on({torch.device("cuda")}) is False


# ------------------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("cls,wd", [(AdaFisher, 0.0), (AdaFisher, 0.05), (AdaFisherW, 0.05)])
def test_one_and_two_steps(cls, wd: float) -> None:
    for steps in (1, 2):
        _compare(_train("triton", steps, cls=cls, weight_decay=wd),
                 _train("torch", steps, cls=cls, weight_decay=wd), 1e-6)


@pytest.mark.parametrize("factor_interval", [1, 3])
def test_fifty_step_trajectory(factor_interval: int) -> None:
    # interval 3: the steps in between precondition with factors blended earlier
    kwargs = dict(weight_decay=0.01, factor_interval=factor_interval)
    _compare(_train("triton", 50, **kwargs), _train("torch", 50, **kwargs), 1e-5)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # intended: x² = inf
def test_accumulation_skipped_steps_and_nonfinite_statistics() -> None:
    kwargs = dict(accumulate=2, skip_scale_every=2, poison_pass=3, weight_decay=0.01)
    ours, ref = _train("triton", 4, **kwargs), _train("torch", 4, **kwargs)
    assert ours[1].nonfinite_statistics > 0
    _compare(ours, ref, 1e-5)


def test_autocast_bf16_activations() -> None:
    _compare(_train("triton", 4, autocast=torch.bfloat16),
             _train("torch", 4, autocast=torch.bfloat16), 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters(dtype: torch.dtype) -> None:
    model_a, opt_a = _train("triton", 3, dtype=dtype)
    model_b, _ = _train("torch", 3, dtype=dtype)
    ulp = torch.finfo(dtype).eps  # both round the same fp32 math: equal up to rare 1-ulp ties
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert p.dtype == dtype and opt_a.state[p]["exp_avg"].dtype == dtype
        torch.testing.assert_close(p, q, rtol=2 * ulp, atol=0)


@pytest.mark.skipif(INTERPRETED, reason="host-device synchronization exists only on a GPU")
def test_step_never_synchronizes() -> None:
    model, opt = _train("triton", 2)
    x, y = _data(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        opt.param_groups[0]["lr"] *= 0.5  # a scheduler's change: new scalars, no sync
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


class OddLayouts(nn.Module):
    """A transposed (non-contiguous) tracked weight, a transposed untracked parameter and a
    float64 layer: the first and last take the torch fallback, the middle one the kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.fc.weight = nn.Parameter(torch.randn(5, 4).t())
        self.mix = nn.Parameter(torch.randn(4, 3).t())  # (3, 4), strides (1, 3)
        self.head = nn.Linear(3, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.fc(x)) @ self.mix.t()
        return self.head(y.double()).float()


def test_fallbacks_match_torch_backend() -> None:
    results = []
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        model = OddLayouts().to(DEVICE)
        assert not model.fc.weight.is_contiguous() and not model.mix.is_contiguous()
        opt = AdaFisher(model, backend=backend, factor_interval=1, lr=3e-4, weight_decay=0.01)
        gen = torch.Generator().manual_seed(2)
        for _ in range(3):
            opt.zero_grad()
            x = torch.randn(6, 5, generator=gen).to(DEVICE)
            model(x).square().mean().backward()
            opt.step()
        results.append(model)
    for (name, p), q in zip(results[0].named_parameters(), results[1].parameters()):
        assert p.stride() == q.stride(), name
        assert rel_err(p.detach(), q.detach()) < 1e-6, name
