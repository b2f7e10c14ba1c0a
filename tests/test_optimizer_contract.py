"""The torch.optim contract: param groups, state_dict/resume, schedulers, closures, bad input."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from adafisher import AdaFisher, AdaFisherW


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.LayerNorm(8), nn.Linear(8, 3),
    )


def data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 3, (4,), generator=g))
            for _ in range(n)]


def loss_of(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("optimizer_class", [AdaFisher, AdaFisherW])
def test_resume_is_bitwise_identical(optimizer_class, tmp_path):
    """Save mid-way (with statistics pending from a backward not yet stepped), load into a
    fresh model and optimizer, continue: the same trajectory as never stopping."""
    batches = data(9)
    hp = dict(lr=2e-3, factor_interval=2, weight_decay=1e-2, gammas=(0.3, 0.2))

    model = make_model()
    opt = optimizer_class(model, **hp)
    for b in batches:
        opt.zero_grad()
        loss_of(model, b).backward()
        opt.step()
    expected = [p.detach().clone() for p in model.parameters()]

    model = make_model()
    opt = optimizer_class(model, **hp)
    for b in batches[:4]:
        opt.zero_grad()
        loss_of(model, b).backward()
        opt.step()
    opt.zero_grad()
    loss_of(model, batches[4]).backward()  # pending statistics for step 4
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "grads": [p.grad for p in model.parameters()]}, tmp_path / "ckpt.pt")

    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model = make_model(seed=123)  # different init: everything must come from the checkpoint
    model.load_state_dict(checkpoint["model"])
    opt = optimizer_class(model, **hp)
    opt.load_state_dict(checkpoint["opt"])
    for p, g in zip(model.parameters(), checkpoint["grads"]):
        p.grad = g
    opt.step()
    for b in batches[5:]:
        opt.zero_grad()
        loss_of(model, b).backward()
        opt.step()
    for p, q in zip(model.parameters(), expected):
        assert torch.equal(p, q)


def test_load_state_dict_rejects_a_different_model():
    opt = AdaFisher(make_model())
    other = AdaFisher(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="tracked layers differ"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="not an AdaFisher state dict"):
        opt.load_state_dict(torch.optim.Adam(make_model().parameters()).state_dict())


def test_param_groups_have_their_own_hyperparameters():
    model = make_model()
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = AdaFisherW(model, [{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0, "lr": 5e-4}], lr=1e-3)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 5e-4]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    opt.zero_grad()
    loss_of(model, data(1)[0]).backward()
    opt.step()
    assert all(len(opt.state[p]) == 2 for p in model.parameters())


def test_schedulers_and_closure():
    model = make_model()
    opt = AdaFisher(model, lr=1e-2, factor_interval=1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    batches = data(4)
    for b in batches:
        loss = opt.step(lambda b=b: (opt.zero_grad(), loss_of(model, b).backward(),
                                     loss_of(model, b))[-1])
        assert isinstance(loss, torch.Tensor)
        cosine.step()
    assert math.isclose(opt.param_groups[0]["lr"], 0.0, abs_tol=1e-12)

    opt.remove_hooks()  # `cosine` keeps the first optimizer alive
    opt = AdaFisher(model, lr=1e-2)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=1e-2, total_steps=4, cycle_momentum=False
    )
    lrs = []
    for b in batches:
        opt.zero_grad()
        loss_of(model, b).backward()
        opt.step()
        one_cycle.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert len(set(lrs)) > 1


def test_nonfinite_statistics_are_discarded_and_counted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    opt = AdaFisher(model, factor_interval=1, gammas=(0.5, 0.5))
    x = torch.randn(4, 3)
    model(x).sum().backward()
    opt.step()
    H, S = opt.factors("0")
    x[0, 0] = 1e30  # x² overflows fp32: Ĥ holds inf, Ŝ stays finite
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
    H2, S2 = opt.factors("0")
    assert torch.equal(H2, H) and not torch.equal(S2, S)
    assert opt.nonfinite_statistics == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_grad_scaler_skipped_step_blends_nothing():
    torch.manual_seed(0)
    model = make_model()
    twin = copy.deepcopy(model)
    opt = AdaFisher(model, factor_interval=1)
    twin_opt = AdaFisher(twin, factor_interval=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    bad, good = data(2)
    # an overflowing iteration: the scaler skips opt.step()
    opt.zero_grad()
    scaler.scale(loss_of(model, bad) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert opt._factor_step == 0
    twin_scaler = torch.amp.GradScaler("cpu", init_scale=scaler.get_scale())
    for m, o, s in ((model, opt, scaler), (twin, twin_opt, twin_scaler)):
        o.zero_grad()
        s.scale(loss_of(m, good)).backward()
        s.step(o)
    for name in opt.tracked_layers:
        for a, b in zip(opt.factors(name), twin_opt.factors(name)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert opt.nonfinite_statistics == 0


def test_bf16_autocast_gives_fp32_statistics_close_to_fp32_run():
    torch.manual_seed(0)
    model = make_model()
    twin = copy.deepcopy(model)
    opt = AdaFisher(model, factor_interval=1, gammas=(0.5, 0.5))
    twin_opt = AdaFisher(twin, factor_interval=1, gammas=(0.5, 0.5))
    batch = data(1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(model, batch)
    loss.backward()
    opt.step()
    loss_of(twin, batch).backward()
    twin_opt.step()
    for name in opt.tracked_layers:
        for a, b in zip(opt.factors(name), twin_opt.factors(name)):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=0.1, atol=2e-3)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(lr="fast"), TypeError, "lr"),
        (dict(beta=1.0), ValueError, r"beta must be in \[0.0, 1.0\)"),
        (dict(beta=-0.1), ValueError, "beta"),
        (dict(damping=-1e-3), ValueError, "damping"),
        (dict(damping=float("nan")), ValueError, "damping"),
        (dict(gammas=(1.5, 0.1)), ValueError, "gammas"),
        (dict(gammas=(0.5,)), ValueError, "gammas"),
        (dict(factor_interval=0), ValueError, "factor_interval"),
        (dict(factor_interval=2.5), TypeError, "factor_interval"),
        (dict(weight_decay=-1.0), ValueError, "weight_decay"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(backend=3), TypeError, "backend"),
    ],
)
def test_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdaFisher(make_model(), **kwargs)


def test_bad_models_and_params():
    model = make_model()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        AdaFisher(list(model.parameters()))
    with pytest.raises(TypeError, match="floating-point"):
        AdaFisher(model, [torch.zeros(3, dtype=torch.long)])
    with pytest.raises(TypeError, match="floating-point"):
        AdaFisher(model, [torch.zeros(3, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(ValueError, match="non-leaf"):
        AdaFisher(model, [torch.randn(3, requires_grad=True) * 2])
    w = model[0].weight
    with pytest.raises(TypeError, match="not a set"):
        AdaFisher(model, [{"params": {w}}])
    with pytest.raises(ValueError, match="listed twice"):
        AdaFisher(model, [w, w])
    with pytest.raises(ValueError, match="more than one parameter group"):
        AdaFisher(model, [{"params": [w]}, {"params": [w]}])
    with pytest.raises(ValueError, match="whole optimizer"):
        AdaFisher(model, [{"params": [w], "factor_interval": 3}])
    with pytest.raises(ValueError, match="single `beta`"):
        AdaFisher(model, [{"params": [w], "betas": (0.9, 0.99)}])
    with pytest.raises(ValueError, match="lr"):
        AdaFisher(model, [{"params": [w], "lr": -1}])


def test_sparse_gradients_are_refused():
    model = nn.Sequential(nn.Embedding(5, 3, sparse=True))
    opt = AdaFisher(model)
    model(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()


def test_state_dict_serializes_to_weights_only():
    model = make_model()
    opt = AdaFisher(model, factor_interval=1)
    loss_of(model, data(1)[0]).backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert set(state["adafisher"]["layers"]) == set(opt.tracked_layers)
