"""Optimizer state and lifecycle: an all-or-nothing ``load_state_dict``, state-dict hooks,
checkpoints across model wrappers, named parameters, pickling and copies of the optimizer and
of the model, and a second optimizer on the same model."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from adafisher import AdaFisher, AdaFisherW

BACKENDS = ["torch", "triton"]  # Triton runs on CPU under TRITON_INTERPRET=1 (conftest.py)
TRACKED = ["0", "1", "4", "5", "6"]


def make_model(width: int = 8, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 5 * 5, width), nn.LayerNorm(width), nn.Linear(width, 3),
    )


def batch(i: int, device="cpu", dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    x = torch.randn(6, 3, 5, 5, generator=g).to(device=device, dtype=dtype)
    return x, torch.randint(0, 3, (6,), generator=g).to(device)


def backward(model, i: int) -> None:
    x, y = batch(i)
    nn.functional.cross_entropy(model(x), y).backward()


def train(model, opt, steps: int, start: int = 0, pending: bool = False) -> None:
    """``steps`` optimizer steps; with ``pending``, one more backward whose statistics wait."""
    for i in range(start, start + steps):
        opt.zero_grad()
        backward(model, i)
        opt.step()
    if pending:
        opt.zero_grad()
        backward(model, start + steps)


def trained(width: int = 8, seed: int = 0, backend: str = "torch", **hp):
    model = make_model(width, seed)
    opt = AdaFisher(model, backend=backend, **{"factor_interval": 1, "gammas": (0.5, 0.5), **hp})
    train(model, opt, 2, pending=True)
    return model, opt


def assert_same(a, b, where: str = "state_dict") -> None:
    """Recursive, exact equality of two state dicts (tensor dtypes and values included)."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    else:
        assert a == b, where


def snapshot(opt) -> dict:
    return copy.deepcopy(opt.state_dict())


def copy_gradients(source, target) -> None:
    """Gradients of a pass whose statistics are pending in a state dict being loaded."""
    for p, q in zip(target.parameters(), source.parameters()):
        p.grad = q.grad.clone()


def assert_same_parameters(model_a, model_b) -> None:
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------ pickling the optimizer (9.5)
@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_pickling_and_copies_are_refused_pointing_to_state_dict(backend, tmp_path):
    model, opt = trained(backend=backend)
    attempts = {
        "pickle": lambda: pickle.dumps(opt),
        "deepcopy": lambda: copy.deepcopy(opt),
        "copy": lambda: copy.copy(opt),
        "torch.save": lambda: torch.save(opt, tmp_path / "opt.pt"),
        "torch.save with the model": lambda: torch.save({"m": model, "o": opt}, io.BytesIO()),
    }
    for attempt in attempts.values():
        with pytest.raises(TypeError, match=r"cannot be pickled.*state_dict\(\)"):
            attempt()
    # The documented way: a new optimizer for a copy of the model, loading the state dict.
    twin = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the copy's hooks are not live: no duplicate warning
        twin_opt = AdaFisher(twin, backend=backend, factor_interval=1)
    twin_opt.load_state_dict(opt.state_dict())  # with the statistics of the pending pass
    copy_gradients(model, twin)
    for source, target in ((model, opt), (twin, twin_opt)):
        target.step()
        train(source, target, 2, start=3)
    assert_same_parameters(model, twin)
    assert_same(opt.state_dict(), twin_opt.state_dict())


# ---------------------------------------------------------------- model copies (9.8)
def _copy_of(model, how: str, tmp_path):
    if how == "deepcopy":
        return copy.deepcopy(model)
    if how == "AveragedModel":
        averaged = torch.optim.swa_utils.AveragedModel(model)
        averaged.update_parameters(model)
        return averaged
    torch.save(model, tmp_path / "model.pt")
    return torch.load(tmp_path / "model.pt", weights_only=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["deepcopy", "AveragedModel", "torch.save"])
def test_model_copies_work_and_carry_no_live_hooks(backend, how, tmp_path):
    from adafisher.hooks import LayerForwardHook  # noqa: PLC0415

    model, opt = trained(backend=backend)
    before = snapshot(opt)
    clone = _copy_of(model, how, tmp_path)
    assert not any(
        isinstance(hook, LayerForwardHook)
        for module in clone.modules() for hook in module._forward_hooks.values()
    )
    # Running the copy, in another dtype and on another device, in training mode with grads
    # (the original takes statistics on its next step), touches nothing and raises nothing.
    for device, dtype in (("cpu", torch.float64), ("meta", torch.float32)):
        clone.to(device=device, dtype=dtype).train()
        x, _ = batch(0, device=device, dtype=dtype)
        clone(x).square().mean().backward()
    assert_same(snapshot(opt), before)
    # The original's hooks are still live: a pass adds to its pending statistics.
    backward(model, 7)
    assert all(opt.state_dict()["adafisher"]["layers"][name]["pending_count"] == 2
               for name in TRACKED)
    opt.step()


# ------------------------------------------------------- a second optimizer on a model (9.9)
def test_a_second_live_optimizer_on_the_same_model_warns_once_naming_it():
    model = make_model()
    first = AdaFisher(model)
    with pytest.warns(UserWarning, match=r"Sequential model already has a live AdaFisher") as rec:
        second = AdaFisher(model)
    assert sum("live AdaFisher" in str(w.message) for w in rec) == 1
    assert all(name in str(rec[0].message) for name in TRACKED)
    del first, second
    gc.collect()
    head = AdaFisher(model, list(model[6].parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        body = AdaFisher(model, list(model[0].parameters()))  # other layers: no conflict
    with pytest.warns(UserWarning, match=r"hooking its layers \['6'\]"):
        body.add_param_group({"params": list(model[6].parameters())})
    del head, body
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = AdaFisher(model)  # the others are gone: nothing to warn about
        third.remove_hooks()
        AdaFisher(model)  # hooks removed: not live


# --------------------------------------------------------- an all-or-nothing load (9.6)
def _layers(state):
    return state["adafisher"]["layers"]


def _set(path_and_value):
    def corrupt(state):
        *path, last = path_and_value[0]
        target = state
        for key in path:
            target = target[key]
        if path_and_value[1] is _DELETE:
            del target[last]
        else:
            target[last] = path_and_value[1](target[last]) if callable(path_and_value[1]) \
                else path_and_value[1]
        return state
    return corrupt


_DELETE = object()
_NAN = float("nan")
CORRUPTIONS = {
    "same layer names, other widths": lambda state: trained(width=9)[1].state_dict(),
    "a factor missing": _set((("adafisher", "layers", "4", "S"), _DELETE)),
    "factor_step missing": _set((("adafisher", "factor_step"), _DELETE)),
    "layers missing": _set((("adafisher", "layers"), _DELETE)),
    "a layer missing": _set((("adafisher", "layers", "6"), _DELETE)),
    "an extra layer": _set((("adafisher", "layers", "7"), {"kind": "linear"})),
    "a kind changed": _set((("adafisher", "layers", "4", "kind"), "conv")),
    "NaN in H": _set((("adafisher", "layers", "4", "H"), lambda h: h.clone().fill_(_NAN))),
    "Inf in S": _set((("adafisher", "layers", "0", "S"), lambda s: s + float("inf"))),
    "a negative factor": _set((("adafisher", "layers", "5", "S"), lambda s: -s)),
    "an integer factor": _set((("adafisher", "layers", "4", "H"), lambda h: h.long())),
    "a float `blended`": _set((("adafisher", "layers", "1", "blended"), lambda b: b.float())),
    "a factor of another shape": _set((("adafisher", "layers", "6", "H"), lambda h: h[:-1])),
    "a negative factor_step": _set((("adafisher", "factor_step"), -1)),
    "bad gammas": _set((("adafisher", "gammas"), (1.5, 0.1))),
    "factor_interval 0": _set((("adafisher", "factor_interval"), 0)),
    "exp_avg of another shape": _set((("state", 0, "exp_avg"), lambda m: m[:1])),
    "exp_avg missing": _set((("state", 3, "exp_avg"), _DELETE)),
    "a NaN step": _set((("state", 2, "step"), _NAN)),
    "a negative step": _set((("state", 2, "step"), torch.tensor(-3.0))),
    "state of an unknown parameter": _set((("state", 99), {})),
    "a group's lr negative": _set((("param_groups", 0, "lr"), -1.0)),
    "a group's beta missing": _set((("param_groups", 0, "beta"), _DELETE)),
    "a group one parameter short": _set((("param_groups", 0, "params"), lambda p: p[:-1])),
    "state missing": _set((("state",), _DELETE)),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_failed_load_changes_nothing(corruption):
    _, source = trained(seed=1)
    model, opt = trained()
    broken = CORRUPTIONS[corruption](copy.deepcopy(source.state_dict()))
    before = snapshot(opt)
    with pytest.raises(ValueError):
        opt.load_state_dict(broken)
    assert_same(snapshot(opt), before)
    opt.step()  # and it still works


@pytest.mark.parametrize("version", [0, 3, None, "2"])
def test_an_unknown_state_version_has_its_own_message(version):
    model, opt = trained()
    state = opt.state_dict()
    state["adafisher"]["version"] = version
    before = snapshot(opt)
    with pytest.raises(ValueError, match=f"version {version!r}"):
        opt.load_state_dict(state)
    assert_same(snapshot(opt), before)


def test_a_version_1_checkpoint_of_a_compiled_model_loads():
    """Version 1 had no gammas / factor_interval and kept torch.compile's prefix in names."""
    source_model, source = trained(gammas=(0.3, 0.2))
    state = source.state_dict()
    old = state["adafisher"]
    del old["gammas"], old["factor_interval"]
    old["version"] = 1
    old["layers"] = {f"_orig_mod.{name}": entry for name, entry in old["layers"].items()}
    model = make_model(seed=3)
    opt = AdaFisher(model, factor_interval=1, gammas=(0.3, 0.2))
    opt.load_state_dict(state)
    assert_same(opt.state_dict(), source.state_dict())


# -------------------------------------------------------------- state-dict hooks (12.4)
def test_state_dict_hooks_see_and_may_rewrite_the_whole_dict():
    model, opt = trained()
    seen = {}
    opt.register_state_dict_post_hook(lambda o, state: seen.update(post="adafisher" in state))
    opt.register_state_dict_post_hook(lambda o, state: {**state, "tag": 1})
    saved = opt.state_dict()
    assert seen["post"] and saved["tag"] == 1

    # An old checkpoint that a load pre-hook upgrades before anything is validated.
    legacy = copy.deepcopy(saved)
    legacy["adafisher"]["version"] = -7
    legacy["adafisher"]["layers"]["classifier"] = legacy["adafisher"]["layers"].pop("6")

    def upgrade(o, state):
        assert state is not legacy  # a shallow copy, as in torch
        extra = dict(state["adafisher"], version=2)
        extra["layers"] = dict(extra["layers"])
        extra["layers"]["6"] = extra["layers"].pop("classifier")
        return {**state, "adafisher": extra}

    fresh_model = make_model(seed=4)
    fresh = AdaFisher(fresh_model, factor_interval=1, gammas=(0.5, 0.5))
    fresh.register_load_state_dict_pre_hook(upgrade)
    fresh.register_load_state_dict_post_hook(
        lambda o: seen.update(loaded=torch.equal(o.factors("6")[1], opt.factors("6")[1]))
    )
    fresh.load_state_dict(legacy)
    assert seen["loaded"]  # post-hooks run after the factors are in
    fresh.register_state_dict_post_hook(lambda o, state: {**state, "tag": 1})
    assert_same(fresh.state_dict(), saved)


# -------------------------------------------------------- Python-number steps (12.5)
def test_a_checkpoint_with_python_number_steps_loads_and_steps():
    source_model, source = trained()
    state = source.state_dict()
    numbers = copy.deepcopy(state)
    for i, param_state in numbers["state"].items():
        param_state["step"] = int(param_state["step"]) if i % 2 else float(param_state["step"])
    runs = []
    for checkpoint in (state, numbers):
        model = make_model(seed=5)
        model.load_state_dict(source_model.state_dict())
        opt = AdaFisher(model)
        opt.load_state_dict(checkpoint)
        assert all(isinstance(s["step"], torch.Tensor) for s in opt.state.values())
        train(model, opt, 2, start=3)
        runs.append(model)
    assert_same_parameters(*runs)


# ------------------------------------------------------------- named parameters (12.7)
def test_named_parameters_are_accepted_and_recorded_as_torch_does():
    named_model, plain_model = make_model(), make_model()
    named = AdaFisher(named_model, named_model.named_parameters(), factor_interval=1)
    plain = AdaFisher(plain_model, factor_interval=1)
    names = [n for n, _ in named_model.named_parameters()]
    assert named.state_dict()["param_groups"][0]["param_names"] == names
    assert "param_names" not in plain.state_dict()["param_groups"][0]
    for model, opt in ((named_model, named), (plain_model, plain)):
        train(model, opt, 3)
    assert_same_parameters(named_model, plain_model)
    assert named.tracked_layers == plain.tracked_layers == TRACKED

    # Named groups, with torch.optim's reference behaviour.
    model = make_model()
    matrices = [(n, p) for n, p in model.named_parameters() if p.ndim > 1]
    vectors = [(n, p) for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": matrices}, {"params": vectors, "weight_decay": 0.0}]
    opt = AdaFisherW(model, groups, weight_decay=0.1)
    reference = torch.optim.AdamW(
        [{"params": matrices}, {"params": vectors, "weight_decay": 0.0}], weight_decay=0.1
    )
    for ours, theirs in zip(opt.state_dict()["param_groups"],
                            reference.state_dict()["param_groups"]):
        assert ours["param_names"] == theirs["param_names"]
        assert ours["params"] == theirs["params"]
    train(model, opt, 1)
    with pytest.raises(ValueError, match="all optimizer param groups should be with/without"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    with pytest.raises(ValueError, match="all .name, tensor. pairs or all tensors"):
        AdaFisher(make_model(), [("a", nn.Parameter(torch.zeros(2))), nn.Parameter(torch.ones(2))])


# --------------------------------------------- gammas and factor_interval saved (12.8)
def test_gammas_and_factor_interval_are_saved_and_restored_on_load():
    source_model, source = trained(gammas=(0.3, 0.2), factor_interval=3)
    state = source.state_dict()
    assert state["adafisher"]["gammas"] == (0.3, 0.2)
    assert state["adafisher"]["factor_interval"] == 3
    model = make_model(seed=6)
    model.load_state_dict(source_model.state_dict())
    opt = AdaFisher(model, backend="torch")  # the defaults: (0.92, 0.008), every 100 steps
    opt.load_state_dict(state)
    copy_gradients(source_model, model)
    assert opt.gammas == (0.3, 0.2) and opt.factor_interval == 3
    for m, o in ((source_model, source), (model, opt)):
        o.step()  # the pending pass
        train(m, o, 5, start=3)
    assert_same_parameters(source_model, model)
    assert_same(source.state_dict(), opt.state_dict())


# -------------------------------------------- checkpoints across model wrappers (9.7)
@pytest.fixture
def single_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        gc.collect()  # DDP objects first: destroying the group under a live DDP can hang
        dist.destroy_process_group()


def _wrap(model, how: str) -> tuple[nn.Module, nn.Module]:
    """The wrapped model, and what to run: the compiled model's own layers run eagerly here
    (what matters is the optimizer built on the wrapper; compiling costs time and leaves
    dynamo's global counters changed for later tests)."""
    if how == "torch.compile":
        return torch.compile(model, backend="eager"), model
    if how == "checkpoint_wrapper":  # wraps a layer inside the model
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (  # noqa: PLC0415
            checkpoint_wrapper,
        )

        model[4] = checkpoint_wrapper(model[4])
        return model, model
    if how == "DataParallel":
        wrapper = nn.DataParallel(model)  # on CPU it just calls the module
    else:
        wrapper = nn.parallel.DistributedDataParallel(model)
    return wrapper, wrapper


@pytest.mark.parametrize(
    "how", ["torch.compile", "DataParallel", "DistributedDataParallel", "checkpoint_wrapper"]
)
def test_checkpoints_move_between_wrapped_and_plain_models(how, request):
    if how == "DistributedDataParallel":
        request.getfixturevalue("single_process_group")
    hp = dict(factor_interval=2, gammas=(0.5, 0.5))
    wrapped_model = make_model()
    wrapped, runs = _wrap(wrapped_model, how)
    opt = AdaFisher(wrapped, **hp)
    assert opt.tracked_layers == TRACKED
    train(runs, opt, 3, pending=True)

    plain_model = make_model(seed=7)
    plain_model.load_state_dict(wrapped_model.state_dict())
    plain = AdaFisher(plain_model, **hp)
    plain.load_state_dict(opt.state_dict())  # wrapped → plain
    copy_gradients(wrapped_model, plain_model)
    assert_same(plain.state_dict(), opt.state_dict())

    back_model = make_model(seed=8)
    back_model.load_state_dict(plain_model.state_dict())
    back_wrapped, back_runs = _wrap(back_model, how)
    back = AdaFisher(back_wrapped, **hp)
    back.load_state_dict(plain.state_dict())  # plain → wrapped
    copy_gradients(wrapped_model, back_model)
    assert_same(back.state_dict(), opt.state_dict())

    for model, o in ((runs, opt), (plain_model, plain), (back_runs, back)):
        o.step()  # the pending pass
        train(model, o, 2, start=4)
    assert_same_parameters(wrapped_model, plain_model)
    assert_same_parameters(wrapped_model, back_model)
    del wrapped, runs, back_wrapped, back_runs
