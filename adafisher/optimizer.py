"""The AdaFisher / AdaFisherW optimizers: the front-end.

It owns the parameter ↔ layer map (by identity, never by position), the hyperparameters and
the state, and hands the math to a backend (``backends/``) working on flat buffers.
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from . import distributed
from .backends import resolve_backend
from .backends.base import Backend, GroupStep
from .factors import FactorBuffers
from .hooks import StatisticsCollector, TrackedLayer
from .layers import FactorIndex, factor_sizes, layer_kind, parameter_roles

_GROUP_HYPERPARAMETERS = ("lr", "beta", "damping", "weight_decay")
# Keys that configure the whole optimizer, or belong to other optimizers: refusing them in a
# param group beats silently ignoring them.
_GLOBAL_ONLY = ("gammas", "factor_interval", "backend")
_FOREIGN = {
    "betas": "AdaFisher has a single `beta`",
    "momentum": "use `beta`",
    "eps": "use `damping`",
}
_STATE_VERSION = 1


def _check_number(name: str, value: Any, low: float, high: float, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    upper_ok = value < high if high_open else value <= high
    if not (math.isfinite(value) or (value == math.inf and high == math.inf)):
        raise ValueError(f"{name} must be finite, got {value}")
    if not (value >= low and upper_ok):
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value}")


def _check_group_hyperparameters(group: dict[str, Any]) -> None:
    _check_number("lr", group["lr"], 0.0, math.inf)
    _check_number("beta", group["beta"], 0.0, 1.0, high_open=True)
    _check_number("damping", group["damping"], 0.0, math.inf)
    _check_number("weight_decay", group["weight_decay"], 0.0, math.inf)


class AdaFisher(torch.optim.Optimizer):
    """AdaFisher (ICLR 2025): Adam-style momentum preconditioned by a diagonal
    Kronecker-factored Fisher, ``p ← p − lr/(1−βᵗ) · m / (S ⊗ H + damping)``, L2 weight decay.

    Args:
        model: the module whose Linear / Conv / BatchNorm / LayerNorm layers get factor hooks.
        params: what to optimize (tensors or param-group dicts, as for ``torch.optim``); groups
            may set their own ``lr``, ``beta``, ``damping`` and ``weight_decay``. Default: the
            model's trainable parameters.
        lr: learning rate (≥ 0).
        beta: momentum coefficient, in [0, 1).
        damping: λ added to the Kronecker factors' product (≥ 0).
        gammas: ``(γ₁, γ₂)``: blend ``factor ← (1−γ₁)·factor + γ₂·normalized``, each in [0, 1].
        factor_interval: statistics are taken before every ``factor_interval``-th step (≥ 1).
        weight_decay: L2 penalty coefficient (≥ 0); decoupled in ``AdaFisherW``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
    """

    decoupled_weight_decay = False

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | None = None,
        *,
        lr: float = 1e-3,
        beta: float = 0.9,
        damping: float = 1e-3,
        gammas: tuple[float, float] = (0.92, 0.008),
        factor_interval: int = 100,
        weight_decay: float = 0.0,
        backend: str = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module (AdaFisher hooks its layers), "
                f"got {type(model).__name__}"
            )
        defaults = dict(lr=lr, beta=beta, damping=damping, weight_decay=weight_decay)
        _check_group_hyperparameters(defaults)
        if not isinstance(gammas, (tuple, list)) or len(gammas) != 2:
            raise ValueError(f"gammas must be a pair (gamma1, gamma2), got {gammas!r}")
        _check_number("gammas[0]", gammas[0], 0.0, 1.0)
        _check_number("gammas[1]", gammas[1], 0.0, 1.0)
        if isinstance(factor_interval, bool) or not isinstance(factor_interval, numbers.Integral):
            raise TypeError(f"factor_interval must be an int, got {type(factor_interval).__name__}")
        if factor_interval < 1:
            raise ValueError(f"factor_interval must be >= 1, got {factor_interval}")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]

        self.gammas = (float(gammas[0]), float(gammas[1]))
        self.factor_interval = int(factor_interval)
        self._model = weakref.ref(model)
        self._backend_request = backend
        self._backend: Backend | None = None
        self._buffers: dict[torch.device, FactorBuffers] = {}
        self._layers: dict[int, TrackedLayer] = {}  # id(module) → its slot
        self._module_order: dict[str, int] = {}  # layer name → position in the model
        self._factor_index: dict[int, tuple[FactorIndex, FactorBuffers]] = {}  # id(param) → …
        self._factor_step = 0  # optimizer steps taken (SPEC §4 counts them from 0)
        self._collector: StatisticsCollector | None = None
        super().__init__(params, defaults)
        # The hooks hold the collector, not the optimizer: removing them when the optimizer
        # goes away needs no reference back to it.
        weakref.finalize(self, self._collector.remove)

    # ----------------------------------------------------------------- param groups and layers
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        for key in _GLOBAL_ONLY:
            if key in param_group:
                raise ValueError(
                    f"{key!r} applies to the whole optimizer and cannot be set per param group"
                )
        for key, hint in _FOREIGN.items():
            if key in param_group:
                raise ValueError(f"param group key {key!r} is not an AdaFisher option: {hint}")
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError("params must be an ordered collection (a list), not a set: "
                            "state_dict matches parameters by their order")
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        seen: set[int] = set()
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params must be tensors, got {type(p).__name__}")
            if not p.is_floating_point():
                raise TypeError(f"params must be real floating-point tensors, got dtype {p.dtype}")
            if id(p) in seen:
                raise ValueError("a parameter is listed twice in one param group")
            seen.add(id(p))
        group = {**self.defaults, **param_group, "params": params}
        _check_group_hyperparameters(group)
        super().add_param_group(group)
        self._track_parameters(params)

    def _ensure_backend(self, params: list[torch.Tensor]) -> Backend:
        if self._backend is None:
            self._backend = resolve_backend(self._backend_request, {p.device for p in params})
            self._collector = StatisticsCollector(self._backend)
        return self._backend

    def _track_parameters(self, params: list[torch.Tensor]) -> None:
        """Map each new parameter to the supported layer that owns it (by identity; a parameter
        shared by several supported layers uses the first in module order)."""
        self._ensure_backend(params)
        model = self._model()
        if model is None:
            raise RuntimeError("the model this optimizer was built for no longer exists")
        wanted = {id(p) for p in params}
        for order, (name, module) in enumerate(model.named_modules()):
            self._module_order.setdefault(name, order)
            kind = layer_kind(module)
            if kind is None:
                continue
            roles = parameter_roles(kind, module)
            owned = [
                (attr, getattr(module, attr))
                for attr in roles
                if id(getattr(module, attr)) in wanted
                and id(getattr(module, attr)) not in self._factor_index
            ]
            if not owned:
                continue
            layer = self._layers.get(id(module))
            if layer is None:
                layer = self._new_layer(name, kind, module, owned[0][1].device)
            for attr, p in owned:
                rows, cols, h_position = roles[attr]
                index = FactorIndex(
                    layer.slot.index, rows, cols, layer.slot.h_offset + h_position,
                    layer.slot.s_offset,
                )
                self._factor_index[id(p)] = (index, layer.buffers)

    def _new_layer(self, name: str, kind, module: nn.Module, device: torch.device) -> TrackedLayer:
        buffers = self._buffers.get(device)
        if buffers is None:
            buffers = self._buffers[device] = FactorBuffers(device)
        h_len, s_len = factor_sizes(kind, module)
        layer = TrackedLayer(buffers.add_layer(name, kind, h_len, s_len), buffers)
        self._layers[id(module)] = layer
        self._collector.track(module, layer)
        return layer

    # --------------------------------------------------------------------------- public API
    @property
    def backend(self) -> str:
        """The backend in use (``"torch"`` or ``"triton"``)."""
        return self._backend.name

    @property
    def tracked_layers(self) -> list[str]:
        """Qualified names of the layers that have factors, in model order."""
        names = [slot.name for b in self._buffers.values() for slot in b.slots]
        return sorted(names, key=self._module_order.__getitem__)

    @property
    def nonfinite_statistics(self) -> int:
        """How many fresh H or S vectors were discarded for holding NaN/Inf (SPEC §3)."""
        return int(sum(int(b.nonfinite.sum()) for b in self._buffers.values()))

    @property
    def slow_path_parameters(self) -> dict[str, str]:
        """Parameters the backend updates one by one on its plain-torch path instead of its
        fused step (name in the model → why), e.g. a weight whose gradient is laid out
        differently. Empty on the torch backend, which has only that path."""
        slow = getattr(self._backend, "slow_path_parameters", None)
        if slow is None:
            return {}
        model = self._model()
        names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        return {names.get(id(p), f"<parameter {tuple(p.shape)}>"): why for p, why in slow()}

    def factors(self, layer_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of ``(H, S)`` of a tracked layer, by its qualified name in the model."""
        for buffers in self._buffers.values():
            for slot in buffers.slots:
                if slot.name == layer_name:
                    state = buffers.layer_state(slot)
                    return state["H"], state["S"]
        raise KeyError(f"no tracked layer named {layer_name!r}; tracked: {self.tracked_layers}")

    def remove_hooks(self) -> None:
        """Detach the statistics hooks from the model. The factors stay as they are; further
        steps precondition with them but take no new statistics."""
        self._collector.remove()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the gradients and the statistics gathered with them: statistics pending from
        a step that never happened (e.g. skipped by ``GradScaler``) are not blended later."""
        super().zero_grad(set_to_none=set_to_none)
        for buffers in self._buffers.values():
            if buffers.has_pending:
                buffers.pending.zero_()
                buffers.pending_count.zero_()
                buffers.has_pending = False

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step: blend pending statistics (SPEC §3; averaged across ranks first
        under ``torch.distributed``, SPEC §7), then update (SPEC §6)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        takes_statistics = self._factor_step % self.factor_interval == 0
        for buffers in self._buffers.values():
            if takes_statistics and distributed.world_size() > 1:
                distributed.all_reduce_pending(buffers)
            if buffers.has_pending:
                self._backend.update_factors(buffers, self.gammas)
        for group in self.param_groups:
            work = self._group_step(group)
            if work.params:
                self._backend.step(work)
        self._factor_step += 1
        self._collector.collecting = self._factor_step % self.factor_interval == 0
        return loss

    def _group_step(self, group: dict[str, Any]) -> GroupStep:
        work = GroupStep(
            [], [], [], [], [], [], lr=float(group["lr"]), beta=float(group["beta"]),
            weight_decay=float(group["weight_decay"]), damping=float(group["damping"]),
            decoupled=self.decoupled_weight_decay,
        )
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise ValueError("AdaFisher does not support sparse gradients (use dense ones)")
            if grad.is_complex():
                raise ValueError("AdaFisher does not support complex gradients")
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            index, buffers = self._factor_index.get(id(p), (None, None))
            work.params.append(p)
            work.grads.append(grad)
            work.exp_avgs.append(state["exp_avg"])
            work.steps.append(int(state["step"].item()))
            work.indices.append(index)
            work.buffers.append(buffers)
        return work

    # ------------------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """The standard optimizer state plus, under ``"adafisher"``, every tracked layer's
        factors, pending statistics and counters (loads with ``weights_only=True``)."""
        state = super().state_dict()
        layers = {}
        for buffers in self._buffers.values():
            for slot in buffers.slots:
                layers[slot.name] = {"kind": slot.kind.value, **buffers.layer_state(slot)}
        state["adafisher"] = {
            "version": _STATE_VERSION,
            "factor_step": self._factor_step,
            "layers": layers,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("adafisher", None)
        if not isinstance(extra, dict) or extra.get("version") != _STATE_VERSION:
            raise ValueError("state_dict is not an AdaFisher state dict (no 'adafisher' entry)")
        saved = extra["layers"]
        slots = {slot.name: (slot, b) for b in self._buffers.values() for slot in b.slots}
        if set(saved) != set(slots):
            raise ValueError(
                "state_dict's tracked layers differ from this optimizer's: "
                f"missing {sorted(set(slots) - set(saved))}, unexpected "
                f"{sorted(set(saved) - set(slots))}"
            )
        for name, (slot, _) in slots.items():
            if saved[name]["kind"] != slot.kind.value:
                raise ValueError(f"layer {name!r} is a {slot.kind.value} layer, state has "
                                 f"{saved[name]['kind']}")
        super().load_state_dict(state_dict)
        for name, (slot, buffers) in slots.items():
            buffers.load_layer_state(slot, saved[name])
        self._factor_step = int(extra["factor_step"])
        self._collector.collecting = self._factor_step % self.factor_interval == 0


class AdaFisherW(AdaFisher):
    """AdaFisher with decoupled weight decay: ``p ← p − lr·(m/(1−βᵗ)/F + wd·p)``."""

    decoupled_weight_decay = True
