"""The torch.optim contract as a table of properties, each run on both backends.

Written from the list of properties PyTorch checks for its own optimizers (``OptimizerInfo`` in
``torch/testing/_internal/common_optimizers.py``, ``TestOptimRenewed``), adapted to AdaFisher's
model-first constructor: one row per property, plus one per failure reported in issue 12.
The Triton backend runs on CPU under the Triton interpreter (``tests/conftest.py``), so models
are tiny and runs short.

Rows marked ``xfail(strict=True)`` name the branch that fixes them; once merged, the lead
removes the mark (strict: a row that starts passing fails until then).
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import adafisher
from adafisher import AdaFisher, AdaFisherW

# "native" runs where adafisher._C is built (CI builds it); the Triton kernels run under
# the interpreter on CPU.
BACKENDS = ["torch", "triton", "native"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ helpers
class Net(nn.Module):
    """Every tracked layer kind, an untracked parameter, and room for odd parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(12, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.ones(3))  # no layer: F = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(torch.relu(self.conv(x))).flatten(1)
        return self.head(torch.tanh(self.norm(self.fc(y)))) * self.scale


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 2, 4, 4, generator=gen), torch.randint(0, 3, (4,), generator=gen))
            for _ in range(n)]


def loss_of(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def train(model, opt, data, scheduler=None) -> list[float]:
    losses = []
    for batch in data:
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def goes_right_direction(model, opt, scheduler=None, steps: int = 6) -> None:
    """Training on one fixed batch lowers its loss."""
    data = batches(1) * steps
    before = loss_of(model, data[0]).item()
    train(model, opt, data, scheduler)
    with torch.no_grad():
        assert loss_of(model, data[0]).item() < before


HP = dict(lr=1e-3, factor_interval=2, gammas=(0.5, 0.5))


def params_equal(a: nn.Module, b: nn.Module, **tol) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=name, **(tol or dict(rtol=0, atol=0)))


def states_equal(a, b, path="state_dict") -> None:
    """Nested state dicts: tensors bitwise equal, everything else ``==``."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for key in a:
            states_equal(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            states_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    else:
        assert a == b, path


# ---------------------------------------------------------------------------- properties
def right_direction_contiguous(backend):
    model = net()
    goes_right_direction(model, AdaFisher(model, backend=backend, **HP))


def right_direction_noncontiguous(backend):
    model = net()
    with torch.no_grad():  # the same values, laid out transposed in memory
        model.fc.weight = nn.Parameter(model.fc.weight.t().contiguous().t())
        model.head.weight = nn.Parameter(model.head.weight.t().contiguous().t())
    assert not model.fc.weight.is_contiguous()
    twin = net()
    goes_right_direction(model, AdaFisher(model, backend=backend, **HP))
    train(twin, AdaFisher(twin, backend=backend, **HP), batches(1) * 6)
    params_equal(model, twin, rtol=1e-5, atol=1e-6)


def right_direction_with_schedulers(backend):
    model = net()
    opt = AdaFisherW(model, backend=backend, weight_decay=1e-2, **HP)
    goes_right_direction(model, opt, torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5))
    model = net()
    opt = AdaFisher(model, backend=backend, **HP)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0)
    data = batches(1) * 6
    for batch in data:
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        opt.step()
        plateau.step(loss.item())
    assert loss_of(model, data[0]).item() < train(net(), AdaFisher(net(), **HP), data[:1])[0]


def param_groups_lr_and_weight_decay(backend):
    model = net()
    groups = [
        {"params": [*model.conv.parameters(), *model.bn.parameters()], "lr": 2e-3},
        {"params": [*model.fc.parameters(), *model.norm.parameters()], "weight_decay": 0.1},
        {"params": [*model.head.parameters(), model.scale], "lr": 5e-4, "beta": 0.5},
    ]
    goes_right_direction(model, AdaFisher(model, groups, backend=backend, **HP))
    frozen = net()
    opt = AdaFisher(frozen, [{"params": frozen.parameters(), "lr": 0.0}], backend=backend, **HP)
    reference = net()
    train(frozen, opt, batches(3))
    params_equal(frozen, reference)  # lr 0 changes nothing


def none_grads_and_frozen_layers(backend):
    model = net()
    model.conv.requires_grad_(False)
    opt = AdaFisher(model, [p for p in model.parameters() if p.requires_grad] + [], backend=backend,
                    **HP)
    conv_before = copy.deepcopy(model.conv.state_dict())
    for batch in batches(3):
        opt.zero_grad()
        loss_of(model, batch).backward()
        model.scale.grad = None  # a trainable parameter without a gradient this step
        opt.step()
    assert model.scale not in opt.state and torch.equal(model.scale, torch.ones(3))
    for key, value in conv_before.items():
        assert torch.equal(model.conv.state_dict()[key], value)
    assert "conv" not in opt.tracked_layers


def zero_size_parameters(backend):
    model = net()
    empty = nn.Parameter(torch.zeros(0, 3))
    opt = AdaFisher(model, [*model.parameters(), empty], backend=backend, **HP)
    for batch in batches(2):
        opt.zero_grad()
        (loss_of(model, batch) + empty.sum()).backward()
        opt.step()
    assert empty.shape == (0, 3) and opt.state[empty]["exp_avg"].shape == (0, 3)


def zero_size_factored_layer(backend):
    """issue 12.3: a Linear with no outputs trains like torch.optim.Adam does."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 0))
    opt = AdaFisher(model, backend=backend, factor_interval=1)
    opt.zero_grad()
    out = model[0](torch.randn(3, 4))
    (out.sum() + model[1](out).sum()).backward()
    opt.step()


def mixed_dtypes(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))
    model[2].to(torch.bfloat16)
    model[4].double()

    def forward(x):
        h = model[1](model[0](x))
        h = model[3](model[2](h.bfloat16())).double()
        return model[4](h)

    x, y = torch.randn(8, 4), torch.randn(8, 2, dtype=torch.float64)
    opt = AdaFisher(model, backend=backend, factor_interval=1)
    before = nn.functional.mse_loss(forward(x), y).item()
    for _ in range(5):
        opt.zero_grad()
        nn.functional.mse_loss(forward(x), y).backward()
        opt.step()
    assert nn.functional.mse_loss(forward(x), y).item() < before
    assert [p.dtype for p in model.parameters()] == [torch.float32] * 2 + [torch.bfloat16] * 2 + [
        torch.float64] * 2
    assert all(opt.state[p]["exp_avg"].dtype == p.dtype for p in model.parameters())


def default_dtype_float64(backend):
    """issue 9.4: the default dtype does not leak into the optimizer's buffers."""
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        model = nn.Sequential(nn.Linear(4, 3, dtype=torch.float32))
        opt = AdaFisher(model, backend=backend, factor_interval=1)
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(5, 4, dtype=torch.float32)).pow(2).sum().backward()
            opt.step()
    finally:
        torch.set_default_dtype(previous)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def zero_grads_change_nothing(backend):
    model = net()
    reference = net()
    opt = AdaFisher(model, backend=backend, **HP)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    params_equal(model, reference)


def state_dict_deterministic_and_round_trips(backend):
    data = batches(6)
    model, twin = net(), net()
    opt = AdaFisher(model, backend=backend, **HP)
    twin_opt = AdaFisher(twin, backend=backend, **HP)
    train(model, opt, data[:3])
    train(twin, twin_opt, data[:3])
    first, second = opt.state_dict(), twin_opt.state_dict()
    states_equal(first, second)
    buffer = io.BytesIO()
    torch.save(first, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    resumed = net()  # not a deepcopy of the hooked model: that is model_copies_work's row
    resumed.load_state_dict(model.state_dict())
    resumed_opt = AdaFisher(resumed, backend=backend, **HP)
    resumed_opt.load_state_dict(loaded)
    states_equal(resumed_opt.state_dict(), first)
    train(model, opt, data[3:])
    train(resumed, resumed_opt, data[3:])
    params_equal(model, resumed)


def step_hooks(backend):
    model = net()
    opt = AdaFisher(model, backend=backend, **HP)
    calls = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o)))
    post = opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o)))
    train(model, opt, batches(1))
    assert calls == [("pre", opt), ("post", opt)]
    pre.remove()
    post.remove()
    train(model, opt, batches(1))
    assert len(calls) == 2


def closure_returns_the_loss(backend):
    model = net()
    opt = AdaFisher(model, backend=backend, **HP)
    batch = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        return loss

    first = opt.step(closure)
    assert isinstance(first, torch.Tensor) and opt.step(closure).item() != first.item()


def errors_for_bad_input(backend):
    model = net()
    w = model.fc.weight
    cases = [
        (dict(lr=-1e-3), ValueError, "lr"),
        (dict(lr=math.inf), ValueError, "lr"),
        (dict(beta=1.0), ValueError, "beta"),
        (dict(damping=0.0), ValueError, "damping"),
        (dict(weight_decay=math.nan), ValueError, "weight_decay"),
        (dict(gammas=(2.0, 0.1)), ValueError, "gammas"),
        (dict(factor_interval=0), ValueError, "factor_interval"),
        (dict(params=[torch.zeros(2, dtype=torch.long)]), TypeError, "floating-point"),
        (dict(params=[w, w]), ValueError, "twice"),
        (dict(params=[{"params": [w], "foreach": True}]), ValueError, "foreach"),
        (dict(params=[{"params": [w], "fused": True}]), ValueError, "fused"),
        (dict(params=[{"params": [w], "differentiable": True}]), ValueError, "differentiable"),
        (dict(params=nn.Linear(2, 2).parameters()), ValueError, "belongs to the model"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            AdaFisher(model, backend=backend, **kwargs)
    opt = AdaFisher(model, backend=backend)
    opt.param_groups[0]["beta"] = 1.0
    loss_of(model, batches(1)[0]).backward()
    with pytest.raises(ValueError, match="beta"):
        opt.step()


def grad_scaler(backend):
    """Scaled training matches unscaled up to the loss scale's effect on S through the 1e-6 ε
    of min-max normalization (issue 12.9); an overflowing step is skipped entirely."""
    data = batches(4)
    model, twin = net(), net()
    opt = AdaFisher(model, backend=backend, **HP)
    twin_opt = AdaFisher(twin, backend=backend, **HP)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for batch in data:
        opt.zero_grad()
        scaler.scale(loss_of(model, batch)).backward()
        scaler.step(opt)
        scaler.update()
    train(twin, twin_opt, data)
    params_equal(model, twin, rtol=1e-4, atol=1e-6)
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    scaler.scale(loss_of(model, data[0]) * math.inf).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt.zero_grad()  # drops the statistics of the skipped pass
    states_equal(opt.state_dict(), state)


def optimizer_deepcopy(backend):
    """A copy of the optimizer is complete, or refused at once pointing to state_dict()."""
    model = net()
    opt = AdaFisher(model, backend=backend, **HP)
    train(model, opt, batches(2))
    try:
        clone = copy.deepcopy(opt)
    except (TypeError, RuntimeError, pickle.PicklingError) as error:
        assert "state_dict" in str(error)
        return
    states_equal(clone.state_dict()["adafisher"], opt.state_dict()["adafisher"])


def model_copies_work(backend):
    """issue 9.8: deepcopy / AveragedModel / torch.save of a hooked model work."""
    model = net()
    opt = AdaFisher(model, backend=backend, **HP)
    train(model, opt, batches(1))
    twin = copy.deepcopy(model)
    torch.optim.swa_utils.AveragedModel(model)
    torch.save(model, io.BytesIO())
    opt.zero_grad()
    loss_of(twin, batches(1)[0]).backward()  # the copy carries no live AdaFisher hooks
    pending = [layer["pending_count"] for layer in opt.state_dict()["adafisher"]["layers"].values()]
    assert all(count == 0 for count in pending)


def maximize(backend):
    """issue 12.1: maximize=True in a group ascends."""
    model = net()
    opt = AdaFisher(model, [{"params": model.parameters(), "maximize": True}], backend=backend,
                    **HP)
    data = batches(1) * 4
    before = loss_of(model, data[0]).item()
    train(model, opt, data)
    assert loss_of(model, data[0]).item() > before


def refused_step_is_atomic(backend):
    """issue 12.2: a step that raises changes nothing."""
    model = net()
    opt = AdaFisher(model, backend=backend, factor_interval=1)
    train(model, opt, batches(1))
    opt.zero_grad()
    loss_of(model, batches(1)[0]).backward()
    model.scale.grad = model.scale.grad.to_sparse()
    state = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    states_equal(opt.state_dict(), state)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


def state_dict_hooks_see_factors(backend):
    """issue 12.4: state_dict / load_state_dict hooks see the whole dict."""
    model = net()
    opt = AdaFisher(model, backend=backend, **HP)
    train(model, opt, batches(1))
    seen = []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append("adafisher" in sd))
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("adafisher" in sd))
    opt.load_state_dict(opt.state_dict())
    assert seen == [True, True]


def load_nontensor_step(backend):
    """issue 12.5: checkpoints whose step counts are Python numbers load and step."""
    model = net()
    opt = AdaFisher(model, backend=backend, **HP)
    train(model, opt, batches(1))
    state = opt.state_dict()
    for entry in state["state"].values():
        entry["step"] = float(entry["step"])
    opt.load_state_dict(state)
    train(model, opt, batches(1))


def gradient_free_step(backend):
    """issue 12.6: a step without gradients counts nothing."""
    model = net()
    opt = AdaFisher(model, backend=backend, **HP)
    train(model, opt, batches(3))
    opt.zero_grad()
    before = opt.state_dict()["adafisher"]["factor_step"]
    opt.step()
    assert opt.state_dict()["adafisher"]["factor_step"] == before


def named_parameters(backend):
    """issue 12.7: named parameters are accepted, like torch ≥ 2.6 optimizers."""
    model = net()
    opt = AdaFisher(model, model.named_parameters(), backend=backend, **HP)
    train(model, opt, batches(1))


def schedule_hyperparameters_in_state_dict(backend):
    """issue 12.8: gammas and factor_interval travel with the state dict."""
    model = net()
    opt = AdaFisher(model, backend=backend, **HP)
    train(model, opt, batches(1))
    other = AdaFisher(net(), backend=backend, factor_interval=7)
    try:
        other.load_state_dict(opt.state_dict())
    except ValueError as error:
        assert "factor_interval" in str(error) or "gammas" in str(error)
        return
    assert other.factor_interval == HP["factor_interval"] and other.gammas == HP["gammas"]


def cyclic_schedulers_with_defaults(backend):
    """issue 9.11: OneCycleLR / CyclicLR cycle beta through the momentum alias."""
    for make in (
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-3, total_steps=10),
        lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=1e-4, max_lr=1e-3, step_size_up=2),
    ):
        model = net()
        opt = AdaFisher(model, backend=backend, **HP)
        goes_right_direction(model, opt, make(opt))


def printable(backend):
    model = net()
    text = repr(AdaFisher(model, backend=backend, **HP))
    assert "AdaFisher" in text and "lr" in text


# ------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Property:
    name: str
    check: Callable[[str], None]
    fixed_on: str | None = None  # a branch that fixes it: strict xfail here until merged
    fixed_backends: tuple[str, ...] = tuple(BACKENDS)  # the backends on which it fails here



PROPERTIES = [
    Property("right_direction_contiguous", right_direction_contiguous),
    Property("right_direction_noncontiguous", right_direction_noncontiguous),
    Property("right_direction_with_schedulers", right_direction_with_schedulers),
    Property("param_groups_lr_and_weight_decay", param_groups_lr_and_weight_decay),
    Property("none_grads_and_frozen_layers", none_grads_and_frozen_layers),
    Property("zero_size_parameters", zero_size_parameters),
    Property("zero_size_factored_layer", zero_size_factored_layer),
    Property("mixed_dtypes", mixed_dtypes),
    Property("default_dtype_float64", default_dtype_float64),
    Property("zero_grads_change_nothing", zero_grads_change_nothing),
    Property("state_dict_deterministic_and_round_trips", state_dict_deterministic_and_round_trips),
    Property("step_hooks", step_hooks),
    Property("closure_returns_the_loss", closure_returns_the_loss),
    Property("errors_for_bad_input", errors_for_bad_input),
    Property("grad_scaler", grad_scaler),
    Property("optimizer_deepcopy", optimizer_deepcopy),
    Property("model_copies_work", model_copies_work),
    Property("maximize", maximize),
    Property("refused_step_is_atomic", refused_step_is_atomic),
    Property("state_dict_hooks_see_factors", state_dict_hooks_see_factors),
    Property("load_nontensor_step", load_nontensor_step),
    Property("gradient_free_step", gradient_free_step),
    Property("named_parameters", named_parameters),
    Property("schedule_hyperparameters_in_state_dict", schedule_hyperparameters_in_state_dict),
    Property("cyclic_schedulers_with_defaults", cyclic_schedulers_with_defaults),
    Property("printable", printable),
]


def _cases():
    for prop in PROPERTIES:
        for backend in BACKENDS:
            marks = []
            if backend == "native" and not adafisher.native_available():
                marks.append(pytest.mark.skip(reason="adafisher._C not built"))
            if prop.fixed_on is not None and backend in prop.fixed_backends:
                reason = f"fixed on branch {prop.fixed_on}"
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
            yield pytest.param(prop, backend, id=f"{prop.name}-{backend}", marks=marks)


@pytest.mark.parametrize("prop, backend", list(_cases()))
def test_property(prop: Property, backend: str) -> None:
    prop.check(backend)
