"""The optimizer's checkpoint: ``state_dict`` and an all-or-nothing ``load_state_dict``.

Besides torch's ``state`` and ``param_groups``, the ``"adafisher"`` entry holds every tracked
layer's factors, pending statistics and counters (keyed by the layer's name in the unwrapped
model, see ``module_names``), the factor step, ``gammas`` and ``factor_interval``.

As in ``torch.optim``, the optimizer's state-dict hooks wrap everything: post-hooks see the
``"adafisher"`` entry, and load pre-hooks receive, and may rewrite, the dict with it (e.g. to
upgrade an old checkpoint) before anything is validated. Loading validates the whole dict,
then writes: a load that raises leaves the optimizer as it was.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .validation import GROUP_HYPERPARAMETERS, check_group_hyperparameters

if TYPE_CHECKING:
    from .factors import FactorBuffers, LayerSlot
    from .optimizer import AdaFisher

STATE_VERSION = 2
# Version 1 had no gammas / factor_interval and named layers with their wrappers' prefixes.
_READABLE_VERSIONS = (1, 2)
# Group options a checkpoint must carry (``maximize`` came later: older ones get the default).
_REQUIRED_GROUP_KEYS = tuple(k for k in GROUP_HYPERPARAMETERS if k != "maximize")
_TORCH_HOOKS = (
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


@contextlib.contextmanager
def _torch_hooks_detached(opt: AdaFisher) -> Iterator[None]:
    """torch's own (de)serialization without running the user's hooks: we run them around
    the whole AdaFisher dict instead."""
    saved = {name: getattr(opt, name) for name in _TORCH_HOOKS}
    for name in _TORCH_HOOKS:
        setattr(opt, name, OrderedDict())
    try:
        yield
    finally:
        for name, hooks in saved.items():
            setattr(opt, name, hooks)


def _slots(opt: AdaFisher) -> dict[str, tuple[LayerSlot, FactorBuffers]]:
    return {
        slot.name: (slot, buffers) for buffers in opt._buffers.values() for slot in buffers.slots
    }


def state_dict(opt: AdaFisher) -> dict[str, Any]:
    for pre_hook in opt._optimizer_state_dict_pre_hooks.values():
        pre_hook(opt)
    with _torch_hooks_detached(opt):
        state = torch.optim.Optimizer.state_dict(opt)
    layers = {
        name: {"kind": slot.kind.value, **buffers.layer_state(slot)}
        for name, (slot, buffers) in _slots(opt).items()
    }
    state["adafisher"] = {
        "version": STATE_VERSION,
        "factor_step": opt._factor_step,
        "gammas": tuple(opt.gammas),
        "factor_interval": opt.factor_interval,
        "layers": layers,
    }
    for post_hook in opt._optimizer_state_dict_post_hooks.values():
        result = post_hook(opt, state)
        if result is not None:
            state = result
    return state


def load_state_dict(opt: AdaFisher, state_dict: Mapping[str, Any]) -> None:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    state_dict = dict(state_dict)  # shallow copy, as torch does: hooks may edit it
    for pre_hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(opt, state_dict)
        if result is not None:
            state_dict = result
    loaded = _validated(opt, state_dict)
    # Nothing below can fail on a validated dict.
    with _torch_hooks_detached(opt):
        torch.optim.Optimizer.load_state_dict(opt, loaded.torch_state)
    for slot, buffers, values in loaded.layers:
        buffers.load_layer_state(slot, values)
    for buffers in opt._buffers.values():
        buffers.has_pending = bool((buffers.pending_count > 0).any())
    opt.gammas = loaded.gammas
    opt.factor_interval = loaded.factor_interval
    opt._factor_step = loaded.factor_step  # the hooks derive from it whether they collect
    for post_hook in opt._optimizer_load_state_dict_post_hooks.values():
        post_hook(opt)


# ----------------------------------------------------------------------------- validation
@dataclass
class _Loaded:
    torch_state: dict[str, Any]
    layers: list[tuple[LayerSlot, FactorBuffers, dict[str, torch.Tensor]]]
    factor_step: int
    gammas: tuple[float, float]
    factor_interval: int


def _invalid(message: str) -> ValueError:
    return ValueError(f"cannot load this state_dict: {message}")


def _is_real(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


def _validated(opt: AdaFisher, state_dict: dict[str, Any]) -> _Loaded:
    """Everything ``load_state_dict`` will write, checked and converted; raises on the first
    problem, before anything was written."""
    extra = state_dict.get("adafisher")
    if not isinstance(extra, Mapping):
        raise ValueError("state_dict is not an AdaFisher state dict (no 'adafisher' entry)")
    version = extra.get("version")
    if version not in _READABLE_VERSIONS:
        raise ValueError(
            f"state_dict['adafisher'] has format version {version!r}; this AdaFisher reads "
            f"versions {_READABLE_VERSIONS} (was it saved by a newer AdaFisher?)"
        )
    required = ("factor_step", "layers") + (("gammas", "factor_interval") if version >= 2 else ())
    for key in required:
        if key not in extra:
            raise _invalid(f"state_dict['adafisher'] has no {key!r} entry")
    factor_step = extra["factor_step"]
    if isinstance(factor_step, torch.Tensor) and factor_step.numel() == 1:
        factor_step = factor_step.item()
    if isinstance(factor_step, bool) or not isinstance(factor_step, numbers.Integral) \
            or factor_step < 0:
        raise _invalid(f"'factor_step' must be an int >= 0, got {factor_step!r}")
    gammas, factor_interval = _validated_schedule(opt, extra, version)
    layers = _validated_layers(opt, extra["layers"], version)
    torch_state = _validated_torch_state(opt, state_dict)
    return _Loaded(torch_state, layers, int(factor_step), gammas, factor_interval)


def _validated_schedule(
    opt: AdaFisher, extra: Mapping[str, Any], version: int
) -> tuple[tuple[float, float], int]:
    """The checkpoint's ``gammas`` and ``factor_interval`` (restored on load, as torch restores
    each group's ``lr``); version 1 did not save them: the optimizer's own stay."""
    if version < 2:
        return opt.gammas, opt.factor_interval
    gammas, interval = extra["gammas"], extra["factor_interval"]
    if not (
        isinstance(gammas, (tuple, list)) and len(gammas) == 2
        and all(_is_real(g) and 0.0 <= g <= 1.0 for g in gammas)
    ):
        raise _invalid(f"'gammas' must be a pair of numbers in [0, 1], got {gammas!r}")
    if isinstance(interval, bool) or not isinstance(interval, numbers.Integral) or interval < 1:
        raise _invalid(f"'factor_interval' must be an int >= 1, got {interval!r}")
    return (float(gammas[0]), float(gammas[1])), int(interval)


def _legacy_layer_names(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """Version 1 named layers as in the model it was given, wrappers included: drop the
    components torch.compile (``_orig_mod``) and DDP/DataParallel (``module``) insert when
    that yields a tracked layer's name."""
    renamed = {}
    for name, entry in saved.items():
        if name not in current:
            parts = [p for p in name.split(".") if p not in ("_orig_mod", "module")]
            if ".".join(parts) in current:
                name = ".".join(parts)
        renamed[name] = entry
    return renamed if len(renamed) == len(saved) else dict(saved)


def _validated_layers(
    opt: AdaFisher, saved: Any, version: int
) -> list[tuple[LayerSlot, FactorBuffers, dict[str, torch.Tensor]]]:
    if not isinstance(saved, Mapping):
        raise _invalid(f"'layers' must be a dict, got {type(saved).__name__}")
    slots = _slots(opt)
    if version < 2:
        saved = _legacy_layer_names(saved, slots)
    if set(saved) != set(slots):
        raise ValueError(
            "state_dict's tracked layers differ from this optimizer's: "
            f"missing {sorted(set(slots) - set(saved))}, unexpected "
            f"{sorted(set(saved) - set(slots))}"
        )
    layers = []
    for name, (slot, buffers) in slots.items():
        entry = saved[name]
        if not isinstance(entry, Mapping):
            raise _invalid(f"layer {name!r}: expected a dict, got {type(entry).__name__}")
        if entry.get("kind") != slot.kind.value:
            raise ValueError(f"layer {name!r} is a {slot.kind.value} layer, state has "
                             f"{entry.get('kind')}")
        values = {}
        for key, current in buffers.layer_state(slot).items():
            values[key] = _validated_layer_tensor(name, key, entry.get(key), current)
        layers.append((slot, buffers, values))
    return layers


def _validated_layer_tensor(
    layer: str, key: str, value: Any, current: torch.Tensor
) -> torch.Tensor:
    where = f"layer {layer!r}: {key!r}"
    if not isinstance(value, torch.Tensor):
        raise _invalid(f"{where} must be a tensor, got {type(value).__name__}")
    if value.shape != current.shape:
        raise _invalid(f"{where} has shape {tuple(value.shape)}, this optimizer expects "
                       f"{tuple(current.shape)} (a model with other layer sizes?)")
    if current.dtype == torch.bool:
        dtype_ok = value.dtype == torch.bool
    elif current.is_floating_point():
        dtype_ok = value.is_floating_point()
    else:
        dtype_ok = not value.is_floating_point() and not value.is_complex() \
            and value.dtype != torch.bool
    if not dtype_ok:
        raise _invalid(f"{where} has dtype {value.dtype}, expected one like {current.dtype}")
    if key in ("H", "S", "pending_count"):
        if not bool(torch.isfinite(value).all()):
            raise _invalid(f"{where} holds NaN or Inf")
    if key in ("H", "S", "pending_count", "nonfinite") and bool((value < 0).any()):
        raise _invalid(f"{where} holds negative values (factors and counts are >= 0)")
    return value.detach().to(device=current.device, dtype=current.dtype)


def _validated_torch_state(opt: AdaFisher, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """torch's ``state`` and ``param_groups``, checked against this optimizer's parameters,
    with per-parameter ``step`` numbers converted to tensors (older torch checkpoints)."""
    for key in ("state", "param_groups"):
        if key not in state_dict:
            raise _invalid(f"no {key!r} entry")
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(saved_groups, (list, tuple)) or not all(
        isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple))
        for g in saved_groups
    ):
        raise _invalid("'param_groups' must be a list of dicts, each with a 'params' list")
    if not isinstance(saved_state, Mapping):
        raise _invalid(f"'state' must be a dict, got {type(saved_state).__name__}")
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    id_to_param, groups = {}, []
    for i, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError("loaded state dict contains a parameter group "
                             "that doesn't match the size of optimizer's group")
        missing = [key for key in _REQUIRED_GROUP_KEYS if key not in saved]
        if missing:
            raise _invalid(f"param group {i} has no {missing} entries")
        # Options added after the checkpoint was written keep this optimizer's values.
        saved = {**{k: v for k, v in group.items() if k not in ("params", "param_names")},
                 **saved}
        try:
            check_group_hyperparameters(saved)
        except (TypeError, ValueError) as error:
            raise _invalid(f"param group {i}: {error}") from error
        groups.append(saved)
        id_to_param.update(zip(saved["params"], group["params"]))

    state = {}
    for param_id, param_state in saved_state.items():
        param = id_to_param.get(param_id)
        if param is None:
            raise _invalid(f"'state' has an entry for parameter {param_id!r}, which no param "
                           "group lists")
        if not isinstance(param_state, Mapping):
            raise _invalid(f"state of parameter {param_id!r} must be a dict")
        param_state = dict(param_state)
        if param_state:
            param_state["step"] = _validated_step(param_id, param_state.get("step"))
            exp_avg = param_state.get("exp_avg")
            if not isinstance(exp_avg, torch.Tensor) or not exp_avg.is_floating_point():
                raise _invalid(f"parameter {param_id!r}: 'exp_avg' must be a floating-point "
                               f"tensor, got {type(exp_avg).__name__}")
            if exp_avg.shape != param.shape:
                raise _invalid(
                    f"parameter {param_id!r}: 'exp_avg' has shape {tuple(exp_avg.shape)}, the "
                    f"parameter has {tuple(param.shape)} (a model with other layer sizes?)"
                )
        state[param_id] = {key: _unaliased(key, value, param) for key, value in param_state.items()}
    return {**state_dict, "state": state, "param_groups": groups}


def _unaliased(key: Any, value: Any, param: torch.Tensor) -> Any:
    """A tensor that torch's loader would keep as it is (``step``, or already on the
    parameter's device in its dtype), copied: loading a live ``state_dict()`` must not share
    step counts or momentum with its source."""
    if not isinstance(value, torch.Tensor):
        return value
    kept = key == "step" or (
        value.device == param.device
        and (value.dtype == param.dtype or not param.is_floating_point())
    )
    return value.detach().clone() if kept else value


def _validated_step(param_id: Any, step: Any) -> torch.Tensor:
    if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_complex():
        value = float(step.item())
    elif _is_real(step):
        value = float(step)
    else:
        raise _invalid(f"parameter {param_id!r}: 'step' must be a number or a one-element "
                       f"tensor, got {step!r}")
    if not (math.isfinite(value) and value >= 0 and value == int(value)):
        raise _invalid(f"parameter {param_id!r}: 'step' must be a whole number >= 0, got {value}")
    if isinstance(step, torch.Tensor):
        return step
    return torch.tensor(value)  # what a fresh state holds
