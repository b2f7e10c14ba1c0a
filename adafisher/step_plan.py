"""Cached arguments of the fused step (the native and Triton backends' hot path).

Per parameter group, the ``adafisher::fused_step`` argument lists (momenta, step-count tensors,
factor offsets) are built once and rebuilt only when the set of parameters that have a gradient
changes, or the optimizer's state is replaced (``load_state_dict``). A steady-state step then
reads each parameter's ``.grad`` (new tensors after ``zero_grad(set_to_none=True)``), writes lr
into a tensor, and launches one op per device (which also counts the step):
no per-parameter ``.item()``, no host read of device data, nothing a CUDA graph would replay
with stale values except a float ``lr`` (set ``group["lr"]`` to a tensor for that, as with
``torch.optim``'s ``capturable=True``).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ._compile import outside_compiled_graphs
from .factors import FactorBuffers
from .layers import FactorIndex


@dataclass
class DeviceLaunch:
    """The arguments of one ``fused_step`` call (one device of one group)."""

    device: torch.device
    positions: list[int] = field(default_factory=list)  # into the group's params
    params: list[torch.Tensor] = field(default_factory=list)
    exp_avgs: list[torch.Tensor] = field(default_factory=list)
    steps: list[torch.Tensor] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    h_offsets: list[int] = field(default_factory=list)
    s_offsets: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    factors: torch.Tensor | None = None
    blended: torch.Tensor | None = None
    lr: torch.Tensor | None = None
    lr_value: float | None = None  # the float last written into ``lr``
    one: torch.Tensor | None = None  # 1.0 (float64): ``one * lr`` keeps a traced lr symbolic
    # The launch's gradients out of the group's list, picked in C (no Python loop per
    # parameter): the list itself when the launch takes every parameter in order.
    pick: Callable[[list], Any] | None = None


@dataclass
class GroupPlan:
    has_grad: tuple[bool, ...]
    state: Any  # the optimizer's state mapping the plan was built from (by identity)
    launches: list[DeviceLaunch]
    steps: list[torch.Tensor]  # every step count of the group
    buffers: list[tuple[FactorBuffers, torch.Tensor]]  # factors the launches read (grow → new)
    # id(buffers) → indices of its layers whose parameters have a gradient (unfed-layer check)
    layers_with_grads: dict[int, set[int]] = field(default_factory=dict)


class StepPlan:
    """``op_name``: the ``adafisher`` op the launches call — ``fused_step`` (native) or an op
    with its schema (``triton_fused_step``), looked up at each launch (so it can be patched,
    e.g. stubbed by ``bench/host_time.py``); ``on_build(plan, grads)``: called after a plan
    is (re)built, e.g. to note parameters the op will step on a slow path."""

    def __init__(self, op_name: str = "fused_step",
                 on_build: Callable[[GroupPlan, list], None] | None = None) -> None:
        self._groups: dict[int, GroupPlan] = {}  # id(group["params"]) → plan
        self._op_name = op_name
        self._on_build = on_build
        _build.prepare()

    def forget(self) -> None:
        """Drop every cached plan (the optimizer's state was replaced, e.g. by a load)."""
        self._groups.clear()

    def prepare(self, optimizer, group: dict[str, Any]) -> tuple[GroupPlan, list]:
        """The group's plan and its current gradients, rebuilt (and the gradients checked)
        when needed; raises before anything is launched.

        The steady state runs no Python bytecode per parameter: ``map`` with C callables reads
        the gradients and compares which parameters have one (a tuple compare)."""
        params = group["params"]
        if torch.compiler.is_compiling():  # traced once: plain comprehensions trace best
            grads = [p.grad for p in params]
            has_grad = tuple(g is not None for g in grads)
        else:
            grads = list(map(_GRAD, params))
            has_grad = tuple(map(_HAS_VALUE, grads))
        _check_gradients(grads, compiling=torch.compiler.is_compiling())
        plan = self._groups.get(id(params))
        if (plan is None or plan.has_grad != has_grad or plan.state is not optimizer.state
                or any(b.factors is not f for b, f in plan.buffers)):
            plan = self._groups[id(params)] = _build(optimizer, params, grads, has_grad)
            if self._on_build is not None:
                self._on_build(plan, grads)
        return plan, grads

    def launch(self, plan: GroupPlan, grads: list, group: dict[str, Any],
               decoupled: bool) -> None:
        """One ``fused_step`` per device for a prepared group."""
        if not plan.steps:
            return
        lr = group["lr"]
        compiling = torch.compiler.is_compiling()
        fused_step = getattr(torch.ops.adafisher, self._op_name)
        for launch in plan.launches:
            if isinstance(lr, torch.Tensor):
                lr_tensor = lr.to(device=launch.device, dtype=torch.float64)
            elif compiling:
                # A float lr stays a symbolic input of the graph through an arithmetic op (no
                # recompile when a schedule changes it); fill_ would bake it in as a constant.
                lr_tensor = launch.one * lr
            else:
                if lr != launch.lr_value:  # written once per change (a launch on a GPU)
                    launch.lr.fill_(lr)
                    launch.lr_value = lr
                lr_tensor = launch.lr
            if compiling:
                step_grads = [grads[i] for i in launch.positions]
            else:
                step_grads = launch.pick(grads)
            fused_step(
                launch.params, step_grads, launch.exp_avgs,
                launch.steps, launch.factors, launch.blended, launch.layers, launch.h_offsets,
                launch.s_offsets, launch.rows, lr_tensor, float(group["beta"]),
                float(group["damping"]), float(group["weight_decay"]), decoupled,
                bool(group.get("maximize", False)),
            )


_GRAD = operator.attrgetter("grad")  # param ↦ param.grad, in C
_HAS_VALUE = functools.partial(operator.is_not, None)  # grad ↦ grad is not None, in C
_LAYOUT = operator.attrgetter("layout")
_STRIDED = frozenset((torch.strided,))


def _check_gradients(grads: list, compiling: bool) -> None:
    """Refuse sparse gradients on every step, before anything changes (a plan outlives the
    gradients it was built with); the steady state loops in C only (~0.1 µs a gradient).
    Complex gradients are checked here too when a layout is off, and at every plan rebuild;
    a real parameter takes one only if its ``grad_dtype`` was set to None."""
    if not compiling and _STRIDED.issuperset(map(_LAYOUT, filter(_HAS_VALUE, grads))):
        return
    for grad in grads:
        if grad is not None and grad.is_sparse:
            raise ValueError("AdaFisher does not support sparse gradients (use dense ones)")
        if grad is not None and grad.is_complex():
            raise ValueError("AdaFisher does not support complex gradients")


def _picker(positions: list[int], n_params: int) -> Callable[[list], Any]:
    """``grads ↦ [grads[i] for i in positions]`` without a Python loop."""
    if positions == list(range(n_params)):
        return _same
    if len(positions) == 1:
        index = positions[0]
        return lambda grads: (grads[index],)
    return operator.itemgetter(*positions)


def _same(grads: list) -> list:
    return grads


# Built eagerly (a graph break under torch.compile on the steps that rebuild, like
# torch.optim's lazy state initialization); steady-state steps trace into one graph.
@outside_compiled_graphs
def _build(optimizer, params: list[torch.Tensor], grads: list, has_grad: tuple) -> GroupPlan:
    _check_gradients(grads, compiling=True)  # every gradient, complex ones included
    factor_index: dict[int, tuple[FactorIndex, FactorBuffers]] = optimizer._factor_index
    # One launch per (device, factor buffer): a device holds one buffer per factor dtype.
    # Untracked parameters (F = 1) join their device's first launch.
    launches: dict[tuple[torch.device, int | None], DeviceLaunch] = {}
    first: dict[torch.device, int] = {}
    for p, grad in zip(params, grads):
        index, buffers = factor_index.get(id(p), (None, None))
        if grad is not None and index is not None and p.numel() > 0:
            first.setdefault(p.device, id(buffers))
    read: dict[int, tuple[FactorBuffers, torch.Tensor]] = {}
    layers_with_grads: dict[int, set[int]] = {}
    for i, p in enumerate(params):
        grad = grads[i]
        if grad is None:
            continue
        state = optimizer.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if p.device.type != "cpu" and state["step"].device != p.device:
            state["step"] = state["step"].to(p.device)  # counted on the device (capturable)
        index, buffers = factor_index.get(id(p), (None, None))
        tracked = index is not None and p.numel() > 0
        key = (p.device, id(buffers) if tracked else first.get(p.device))
        launch = launches.get(key)
        if launch is None:
            launch = launches[key] = DeviceLaunch(p.device)
            launch.lr = torch.zeros((), dtype=torch.float64, device=p.device)
            launch.one = torch.ones((), dtype=torch.float64, device=p.device)
        launch.positions.append(i)
        launch.params.append(p)
        launch.exp_avgs.append(state["exp_avg"])
        launch.steps.append(state["step"])
        if index is not None:
            layers_with_grads.setdefault(id(buffers), set()).add(index.layer)
        if not tracked:  # nothing to precondition (no layer, or a zero-size layer)
            launch.layers.append(-1)
            launch.h_offsets.append(0)
            launch.s_offsets.append(0)
            launch.rows.append(1)
            continue
        launch.factors, launch.blended = buffers.factors, buffers.blended
        read[id(buffers)] = (buffers, buffers.factors)
        launch.layers.append(index.layer)
        launch.h_offsets.append(index.h_offset)
        launch.s_offsets.append(index.s_offset)
        launch.rows.append(index.rows)
    for launch in launches.values():
        launch.pick = _picker(launch.positions, len(params))
        if launch.factors is None:
            launch.factors = torch.empty(0, device=launch.device)
            launch.blended = torch.empty(0, dtype=torch.bool, device=launch.device)
    steps = [s for launch in launches.values() for s in launch.steps]
    return GroupPlan(has_grad, optimizer.state, list(launches.values()), steps,
                     list(read.values()), layers_with_grads)
