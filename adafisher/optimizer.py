"""The AdaFisher / AdaFisherW optimizers: the front-end.

It owns the parameter ↔ layer map (by identity, never by position), the hyperparameters and
the state, and hands the math to a backend (``backends/``) working on flat buffers.
"""

from __future__ import annotations

import functools
import numbers
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

import torch
from torch import nn
from torch.optim import optimizer as torch_optimizer

from . import checkpoint, distributed, fsdp
from .backends import resolve_backend
from .backends.base import Backend, GroupStep
from .factors import FactorBuffers
from .hooks import StatisticsCollector, TrackedLayer, live_hook_on
from .layers import FactorIndex, factor_sizes, layer_kind, parameter_roles
from .module_names import named_modules
from .step_plan import StepPlan
from .unfed_layers import UnfedLayerCheck
from .validation import (
    GroupChecker,
    check_group_hyperparameters,
    check_group_keys,
    check_number,
)

# Keys that configure the whole optimizer, or belong to other optimizers: refusing them in a
# param group beats silently ignoring them.
_GLOBAL_ONLY = ("gammas", "factor_interval", "backend")
_FOREIGN = {
    "betas": "AdaFisher has a single `beta`",
    "momentum": "use `beta`",
    "eps": "use `damping`",
}


class StatisticsSchedule:
    """The optimizer's step counter that decides when statistics are taken.

    ``collecting`` (does the coming step take statistics?) is a bool that eager steps keep
    current, so hooks traced by torch.compile guard on a bool, not on the count. A traced step
    only counts and marks the bool stale (deciding on the count there would guard on it, one
    graph per phase of the schedule): the next reader derives it from the count."""

    def __init__(self, interval: int) -> None:
        self.factor_step = 0
        self.interval = interval
        self._collecting = True
        self._current = True  # whether _collecting belongs to factor_step and interval

    def changed(self) -> None:
        """factor_step or interval was set (e.g. by a checkpoint load)."""
        self._current = False

    def advance(self) -> None:
        self.factor_step += 1
        if torch.compiler.is_compiling():
            self._current = False
        else:
            self._collecting = self.factor_step % self.interval == 0
            self._current = True

    @property
    def collecting(self) -> bool:
        if not self._current:
            self._collecting = self.factor_step % self.interval == 0
            self._current = True
        return self._collecting


class AdaFisher(torch.optim.Optimizer):
    """AdaFisher (ICLR 2025): Adam-style momentum preconditioned by a diagonal
    Kronecker-factored Fisher, ``p ← p − lr/(1−βᵗ) · m / (S ⊗ H + damping)``, L2 weight decay.

    Args:
        model: the module whose Linear / Conv / BatchNorm / LayerNorm layers get factor hooks.
        params: what to optimize (tensors, ``(name, tensor)`` pairs such as
            ``model.named_parameters()``, or param-group dicts, as for ``torch.optim``); groups
            may set their own ``lr``, ``beta``, ``damping`` and ``weight_decay``. Default: the
            model's trainable parameters.
        lr: learning rate (≥ 0).
        beta: momentum coefficient, in [0, 1).
        damping: λ added to the Kronecker factors' product (finite, > 0).
        gammas: ``(γ₁, γ₂)``: blend ``factor ← (1−γ₁)·factor + γ₂·normalized``, each in [0, 1].
        factor_interval: statistics are taken before every ``factor_interval``-th step (≥ 1).
        weight_decay: L2 penalty coefficient (≥ 0); decoupled in ``AdaFisherW``.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"`` (the compiled
            kernels of ``adafisher._C``; ``"auto"`` picks them on CPU when they are built).
        maximize: maximize the objective (the gradient's sign is flipped), as in ``torch.optim``.

    A param group's ``momentum`` (written by ``OneCycleLR``/``CyclicLR`` when they cycle
    momentum) is an alias of ``beta``: at ``step()``, whichever of the two changed wins.
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
        maximize: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module (AdaFisher hooks its layers), "
                f"got {type(model).__name__}"
            )
        defaults = dict(
            lr=lr, beta=beta, damping=damping, weight_decay=weight_decay, maximize=maximize
        )
        check_group_hyperparameters(defaults)
        if not isinstance(gammas, (tuple, list)) or len(gammas) != 2:
            raise ValueError(f"gammas must be a pair (gamma1, gamma2), got {gammas!r}")
        check_number("gammas[0]", gammas[0], 0.0, 1.0)
        check_number("gammas[1]", gammas[1], 0.0, 1.0)
        if isinstance(factor_interval, bool) or not isinstance(factor_interval, numbers.Integral):
            raise TypeError(f"factor_interval must be an int, got {type(factor_interval).__name__}")
        if factor_interval < 1:
            raise ValueError(f"factor_interval must be >= 1, got {factor_interval}")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]

        # Optimizer steps taken (docs/algorithm.md §4 counts them from 0). Kept on a plain
        # object: under torch.compile, attribute writes on the optimizer itself are dropped
        # from a traced step that also runs tensor ops, while writes to other objects are kept.
        self._schedule = StatisticsSchedule(int(factor_interval))
        self.gammas = (float(gammas[0]), float(gammas[1]))
        self._model = weakref.ref(model)
        self._backend_request = backend
        self._backend: Backend | None = None
        self._buffers: dict[tuple[torch.device, torch.dtype], FactorBuffers] = {}
        self._layers: dict[int, TrackedLayer] = {}  # id(module) → its slot
        self._module_order: dict[str, int] = {}  # layer name → position in the model
        self._factor_index: dict[int, tuple[FactorIndex, FactorBuffers]] = {}  # id(param) → …
        self._collector: StatisticsCollector | None = None
        self._already_hooked: list[str] = []  # layers another live optimizer hooks too
        self._group_checker = GroupChecker()
        self._unfed_check = UnfedLayerCheck()  # names tracked layers that get no statistics
        self._plan: StepPlan | None = None  # the planned backends' cached step arguments
        # "momentum" in defaults tells OneCycleLR/CyclicLR that momentum can be cycled; groups
        # carry it only once a scheduler writes it (see GroupChecker).
        defaults["momentum"] = beta
        super().__init__(params, defaults)
        try:
            self._check_params_belong_to_model(model)
        except ValueError:
            self._collector.remove()  # a refused optimizer leaves no hooks behind
            raise
        self._warn_if_already_hooked()
        # The hooks hold the collector, not the optimizer: removing them when the optimizer
        # goes away needs no reference back to it.
        self._finalizer = weakref.finalize(self, self._collector.remove)

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
        names = [p[0] for p in params if isinstance(p, tuple) and len(p) == 2]
        if names:  # named parameters, recorded as torch.optim does
            if len(names) != len(params):
                raise ValueError("params must be all (name, tensor) pairs or all tensors")
            params = [p[1] for p in params]
            param_group = {**param_group, "param_names": names}
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
        check_group_keys(group, capturable_ok=hasattr(self._ensure_backend(params), "step_plan"))
        check_group_hyperparameters(group)
        super().add_param_group(group)
        group.pop("momentum", None)  # from defaults; only a scheduler sets it (GroupChecker)
        self._track_parameters(params)
        if self._plan is not None and any(fsdp.is_sharded(p) for p in params):
            self._plan = None  # FSDP2 shards: the per-group path steps their local tensors
        if hasattr(self, "_finalizer"):  # after construction (the constructor warns itself)
            self._warn_if_already_hooked()

    def _check_params_belong_to_model(self, model: nn.Module) -> None:
        """Refuse an optimizer none of whose parameters is the model's: its hooks would feed
        nothing (parameters outside the model are fine alongside the model's, with F = 1)."""
        own = {id(p) for p in model.parameters()}
        if not any(id(p) in own for g in self.param_groups for p in g["params"]):
            raise ValueError(
                "none of the given parameters belongs to the model AdaFisher was given: pass "
                "the parameters of the model whose layers it should precondition"
            )

    def _ensure_backend(self, params: list[torch.Tensor]) -> Backend:
        if self._backend is None:
            self._backend = resolve_backend(self._backend_request, {p.device for p in params})
            self._collector = StatisticsCollector(self._backend, self._schedule)
            if hasattr(self._backend, "step_plan"):  # native and Triton: the planned step
                self._plan = self._backend.step_plan()
        return self._backend

    def _track_parameters(self, params: list[torch.Tensor]) -> None:
        """Map each new parameter to the supported layer that owns it (by identity; a parameter
        shared by several supported layers uses the first in module order)."""
        self._ensure_backend(params)
        model = self._model()
        if model is None:
            raise RuntimeError("the model this optimizer was built for no longer exists")
        fsdp.check_parameters(model, params)
        wanted = {id(p) for p in params}
        attention = {  # MultiheadAttention applies its out_proj itself: hooks go on it
            id(m.out_proj): m for m in model.modules() if isinstance(m, nn.MultiheadAttention)
        }
        for order, (name, module) in enumerate(named_modules(model)):
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
                layer = self._new_layer(
                    name, kind, module, owned[0][1], attention.get(id(module))
                )
            for attr, p in owned:
                rows, cols, h_position = roles[attr]
                index = FactorIndex(
                    layer.slot.index, rows, cols, layer.slot.h_offset + h_position,
                    layer.slot.s_offset,
                )
                self._factor_index[id(p)] = (index, layer.buffers)

    def _new_layer(
        self, name: str, kind, module: nn.Module, param: torch.Tensor, owner: nn.Module | None
    ) -> TrackedLayer:
        # One buffer per (device, factor dtype): float64 factors for float64 layers
        # (docs/algorithm.md §1), fp32 for every other dtype; a device holding both kinds has
        # two buffers.
        dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        buffers = self._buffers.get((param.device, dtype))
        if buffers is None:
            buffers = self._buffers[(param.device, dtype)] = FactorBuffers(param.device, dtype)
        h_len, s_len = factor_sizes(kind, module)
        layer = TrackedLayer(buffers.add_layer(name, kind, h_len, s_len), buffers)
        if live_hook_on(module):
            self._already_hooked.append(name)
        self._layers[id(module)] = layer
        self._collector.track(module, layer, owner)
        return layer

    def _warn_if_already_hooked(self) -> None:
        if self._already_hooked:
            model = self._model()
            warnings.warn(
                f"{type(model).__name__} model already has a live AdaFisher optimizer hooking "
                f"its layers {self._already_hooked}: both collect statistics on every pass. "
                "Delete the old optimizer (or call its remove_hooks()) before building a new "
                "one.",
                UserWarning,
                stacklevel=3,
            )
            self._already_hooked = []

    @property
    def factor_interval(self) -> int:
        """Statistics are taken before every ``factor_interval``-th step."""
        return self._schedule.interval

    @factor_interval.setter
    def factor_interval(self, value: int) -> None:
        self._schedule.interval = value
        self._schedule.changed()

    @property
    def _factor_step(self) -> int:
        return self._schedule.factor_step

    @_factor_step.setter
    def _factor_step(self, value: int) -> None:
        self._schedule.factor_step = value
        self._schedule.changed()

    # --------------------------------------------------------------------------- public API
    def __repr__(self) -> str:
        # torch.optim's repr lists param groups only; the optimizer-wide settings go first
        head, _, groups = super().__repr__().partition("\n")
        backend = self._backend.name if self._backend is not None else self._backend_request
        settings = (f"Optimizer-wide\n    backend: {backend}\n"
                    f"    factor_interval: {self.factor_interval}\n    gammas: {self.gammas}\n")
        return f"{head}\n{settings}{groups}"

    @property
    def backend(self) -> str:
        """The backend in use (``"torch"``, ``"triton"`` or ``"native"``)."""
        return self._backend.name

    @property
    def tracked_layers(self) -> list[str]:
        """Qualified names of the layers that have factors, in model order."""
        names = [slot.name for b in self._buffers.values() for slot in b.slots]
        return sorted(names, key=self._module_order.__getitem__)

    @property
    def nonfinite_statistics(self) -> int:
        """How many fresh H or S vectors were discarded for holding NaN/Inf (algorithm.md §3)."""
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
        """One optimizer step: blend pending statistics (docs/algorithm.md §3; averaged across
        ranks first under ``torch.distributed``, §7), then update (§6)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Everything that can refuse the step is checked before anything changes.
        self._group_checker.check(self.param_groups, capturable_ok=self._plan is not None)
        work = plans = None
        if self._plan is None:
            work = [self._group_step(group) for group in self.param_groups]
            if not any(w.params for w in work):
                return loss  # no gradients: nothing changes, the statistics schedule included
        else:
            plans = [self._plan.prepare(self, group) for group in self.param_groups]
            if not any(plan.steps for plan, _ in plans):
                return loss
        # A traced step does not read the statistics schedule (it would guard on the step
        # count): only eager steps check for unfed layers, and the all-reduce decides on it
        # only in a distributed run.
        eager = not torch.compiler.is_compiling()  # the unfed-layer check runs eagerly only
        takes_statistics = eager and self._schedule.collecting
        distributed_run = distributed.world_size() > 1
        if eager:
            self._unfed_check.poll()
        checking = takes_statistics and self._collector.hooked
        with_grads = self._layers_with_grads(work, plans) if checking else {}
        for buffers in self._buffers.values():
            if distributed_run and self._schedule.collecting:
                distributed.all_reduce_pending(buffers)
            if checking and buffers.has_pending:
                self._unfed_check.check(buffers, with_grads.get(id(buffers), ()),
                                        self._collector.seen_without_samples)
            # The planned (native) path launches the update unconditionally: it does nothing
            # when nothing is pending, and no host flag decides what a traced step runs.
            if (self._plan is not None and self._backend.always_update_factors) or (
                    buffers.has_pending):
                self._backend.update_factors(buffers, self.gammas)
        if takes_statistics:  # (a traced step leaves the names for the next eager check)
            self._collector.seen_without_samples.clear()
        if plans is not None:
            for group, (plan, grads) in zip(self.param_groups, plans):
                self._plan.launch(plan, grads, group, self.decoupled_weight_decay)
        else:
            for group_work in work:
                if group_work.params:
                    self._count_steps(group_work)
                    self._backend.step(group_work)
        self._schedule.advance()  # the hooks read the schedule
        return loss

    @staticmethod
    def _layers_with_grads(work: list[GroupStep] | None, plans: list | None) -> dict[int, set]:
        """id(buffers) → indices of its layers whose parameters have gradients this step."""
        layers: dict[int, set[int]] = {}
        if plans is not None:
            for plan, _ in plans:
                for key, indices in plan.layers_with_grads.items():
                    layers.setdefault(key, set()).update(indices)
            return layers
        for group_work in work:
            for index, buffers in zip(group_work.indices, group_work.buffers):
                if index is not None:
                    layers.setdefault(id(buffers), set()).add(index.layer)
        return layers

    def _group_step(self, group: dict[str, Any]) -> GroupStep:
        """The group's parameters that have gradients, validated; changes nothing (their state
        is created and their step counts advanced by ``_count_steps``)."""
        work = GroupStep(
            [], [], [], [], [], [], lr=float(group["lr"]), beta=float(group["beta"]),
            weight_decay=float(group["weight_decay"]), damping=float(group["damping"]),
            decoupled=self.decoupled_weight_decay, maximize=bool(group.get("maximize", False)),
        )
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise ValueError("AdaFisher does not support sparse gradients (use dense ones)")
            if grad.is_complex():
                raise ValueError("AdaFisher does not support complex gradients")
            index, buffers = self._factor_index.get(id(p), (None, None))
            work.params.append(p)
            work.grads.append(grad)
            work.indices.append(index)
            work.buffers.append(buffers)
        return work

    def _count_steps(self, work: GroupStep) -> None:
        for i, p in enumerate(work.params):
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            exp_avg = state["exp_avg"]
            if fsdp.is_sharded(p):  # FSDP2: update the local shard with its rows of S
                work.params[i], work.grads[i], exp_avg, work.indices[i] = fsdp.local_shards(
                    p, work.grads[i], exp_avg, work.indices[i]
                )
            work.exp_avgs.append(exp_avg)
            work.steps.append(int(state["step"].item()))

    # ------------------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """The standard optimizer state plus, under ``"adafisher"``, every tracked layer's
        factors, pending statistics and counters, ``gammas`` and ``factor_interval`` (loads
        with ``weights_only=True``). The state-dict hooks see the whole dict."""
        return fsdp.share_with_param_groups(checkpoint.state_dict(self))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a ``state_dict()``: all of it, or, when anything in it does not fit this
        optimizer, nothing (ValueError). ``gammas`` and ``factor_interval`` come from the
        checkpoint, as each group's ``lr`` does."""
        checkpoint.load_state_dict(self, fsdp.lift_from_param_groups(state_dict))
        if self._plan is not None:
            self._plan.forget()  # its cached momenta and step counts were replaced

    def __getstate__(self) -> NoReturn:
        raise TypeError(
            f"{type(self).__name__} cannot be pickled or copied: it is bound to its model's "
            "layers through hooks. Save optimizer.state_dict() instead, and load it into a new "
            "optimizer built for the model (or its copy) with load_state_dict()."
        )


class AdaFisherW(AdaFisher):
    """AdaFisher with decoupled weight decay (as AdamW is to Adam).

    Same arguments, state and factors as :class:`AdaFisher`; only the update differs::

        m ← β·m + (1−β)·g
        p ← p − lr·(m / (1−βᵗ) / F + weight_decay·p)      F = S ⊗ H + damping

    The decay is not divided by ``F`` and does not enter the momentum, so its strength is
    ``lr·weight_decay`` per step whatever the curvature. The paper uses it for vision
    transformers. See ``docs/algorithm.md`` (update rules) and ``docs/hyperparameters.md``.
    """

    decoupled_weight_decay = True


def _profiler_range_only_when_profiling(step: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.optim``'s wrapper of ``step`` (step pre/post hooks inside a profiler range named
    ``Optimizer.step#<class>.step``), entered only when it has something to do: a profiler runs,
    a step hook is registered, or the step is being traced. Otherwise ``step`` runs directly:
    the range's two dispatcher calls cost about as much host time as a whole steady-state
    native step, and record nothing when no profiler runs."""
    wrapped = torch.optim.Optimizer.profile_hook_step(step)
    global_pre = getattr(torch_optimizer, "_global_optimizer_pre_hooks", None)
    global_post = getattr(torch_optimizer, "_global_optimizer_post_hooks", None)
    profiling = torch._C._autograd._profiler_enabled

    @functools.wraps(step)
    def wrapper(self, *args: Any, **kwargs: Any) -> Any:
        if (global_pre is None or global_post is None or torch.compiler.is_compiling()
                or profiling() or global_pre or global_post
                or self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks):
            return wrapped(self, *args, **kwargs)
        return step(self, *args, **kwargs)

    wrapper.hooked = True  # torch.optim.Optimizer wraps an unhooked step itself
    return wrapper


AdaFisher.step = _profiler_range_only_when_profiling(AdaFisher.step)
