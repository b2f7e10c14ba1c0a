"""Layer hooks that feed fresh statistics into the pending buffer (docs/algorithm.md §4).

A forward hook computes Ĥ from the layer's input and registers a hook on the layer's *output
tensor*; that tensor hook receives the gradient of the output, computes Ŝ and commits the pass.
Unlike module full-backward hooks, a tensor hook keeps working when an in-place op follows the
layer (``ReLU(inplace=True)``, ``out += identity``): it sees the gradient of the pre-in-place
value. A pass whose backward never reaches the layer commits nothing, and neither does one
that does not accumulate the layer's parameter gradients (``torch.autograd.grad`` with respect
to inputs, ``backward(inputs=...)`` without them): statistics follow what ``step()`` consumes.

A backend may take both halves natively (``Backend.hook_commit``; the native backend on CPU):
the forward hook then registers a C++ hook on the same tensor or node, with the same rules,
and the backward runs no Python for statistics. Compiled autograd traces Python hooks only, so
while it is on the Python hooks are used.

``MultiheadAttention`` applies its ``out_proj`` functionally, so that Linear's own hooks never
fire: a forward hook on the attention module reads the projection's input from what autograd
saved for its matmul, and the gradient of the attention output is the projection's.

The hooks reference this collector, never the optimizer, so a model does not keep its
optimizer alive (and the optimizer removes the hooks when it is collected). They hold it weakly
and a copy of a hook (``copy.deepcopy(model)``, ``AveragedModel``, ``torch.save(model)``) is an
inert no-op: model copies never feed, or fail on, the original optimizer.
"""

from __future__ import annotations

import functools
import sys
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.utils.hooks import RemovableHandle

from . import autograd_statistics, fsdp
from ._compile import outside_compiled_graphs
from .backends.base import Backend
from .factors import FactorBuffers, LayerSlot
from .layers import LayerKind
from .statistics import batch_size, has_samples


@dataclass(frozen=True)
class TrackedLayer:
    slot: LayerSlot
    buffers: FactorBuffers


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


def _without_autocast_or_grad(device: torch.device, fn, *args):
    """Statistics are fp32 sums outside autograd; autocast would run the conv count matmul in
    bf16. Contexts are entered only when needed, and grad mode is switched without a context
    manager object: hooks run on every layer of every pass."""
    if _autocast_enabled(device.type):
        with torch.autocast(device_type=device.type, enabled=False), torch.no_grad():
            return fn(*args)
    if torch.is_grad_enabled():
        _set_grad_enabled(False)
        try:
            return fn(*args)
        finally:
            _set_grad_enabled(True)
    return fn(*args)


_set_grad_enabled = torch._C._set_grad_enabled


class InertForwardHook:
    """What a copied AdaFisher hook becomes: it does nothing."""

    def __call__(self, module, args, kwargs, output) -> None:
        return None


class LayerForwardHook:
    """The forward hook registered on a tracked layer. It reaches its collector through a weak
    reference, and pickling or deep-copying it yields an ``InertForwardHook``: a copied model
    carries no live AdaFisher hook (and nothing unpicklable, e.g. Triton kernel modules)."""

    __slots__ = ("_collector", "layer", "out_proj")

    def __init__(
        self, collector: StatisticsCollector, layer: TrackedLayer, out_proj: nn.Linear | None = None
    ) -> None:
        self._collector = weakref.ref(collector)
        self.layer = layer
        # Set when this hook sits on a MultiheadAttention and feeds its out_proj (see track()).
        self.out_proj = out_proj

    def feeds_a_live_collector(self) -> bool:
        return self._collector() is not None

    def __call__(self, module, args, kwargs, output) -> None:
        collector = self._collector()
        if collector is None:
            return
        if self.out_proj is None:
            collector._on_forward(self.layer, module, args, kwargs, output)
        else:
            collector._on_attention_forward(self.layer, self.out_proj, module, args, output)

    def __reduce__(self):
        return InertForwardHook, ()


def live_hook_on(module: nn.Module) -> bool:
    """Whether a live AdaFisher collector already hooks ``module``."""
    return any(
        isinstance(hook, LayerForwardHook) and hook.feeds_a_live_collector()
        for hook in module._forward_hooks.values()
    )


class StatisticsCollector:
    def __init__(self, backend: Backend, schedule) -> None:
        self.backend = backend
        self.schedule = schedule  # the optimizer's StatisticsSchedule
        self._handles: list[RemovableHandle] = []
        # layers whose passes since the last statistics step had no samples (not "unfed")
        self.seen_without_samples: set[str] = set()
        # torch._dynamo.config.compiled_autograd as read at this optimizer step (see below)
        self._compiled_autograd_config: tuple[int, bool] | None = None
        StatisticsCollector._collect.prepare()
        _projection_input.prepare()

    @property
    def collecting(self) -> bool:
        """Does the coming step take statistics?"""
        return self.schedule.collecting

    @property
    def hooked(self) -> bool:
        return bool(self._handles)

    def track(self, module: nn.Module, layer: TrackedLayer, owner: nn.Module | None = None) -> None:
        """Hook a tracked layer; ``owner`` is the MultiheadAttention whose ``out_proj`` it is
        (it applies the projection functionally, so the hook goes on the attention module)."""
        if isinstance(owner, nn.MultiheadAttention) and owner.out_proj is module:
            hook, module = LayerForwardHook(self, layer, out_proj=module), owner
        else:
            hook = LayerForwardHook(self, layer)
        self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_forward(self, layer: TrackedLayer, module, args, kwargs, output) -> None:
        if not (self.collecting and torch.is_grad_enabled()):
            return
        if not (isinstance(output, torch.Tensor) and output.requires_grad):
            return
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor):
            return
        self._collect(layer, module, x, output)

    def _on_attention_forward(self, layer: TrackedLayer, out_proj: nn.Linear, attention, args,
                              output) -> None:
        if not (self.collecting and torch.is_grad_enabled()):
            return
        out = output[0] if isinstance(output, tuple) else output
        if not (isinstance(out, torch.Tensor) and out.requires_grad):
            return
        x = _projection_input(out, out_proj)
        if x is not None:
            self._collect(layer, out_proj, x, out)

    # Under torch.compile the checks above are traced (a step without statistics keeps one
    # whole graph); gathering statistics runs eagerly, outside the graph, instead of being
    # retraced for every layer.
    @outside_compiled_graphs
    def _collect(self, layer: TrackedLayer, module, x: torch.Tensor, output: torch.Tensor) -> None:
        if x.device != layer.buffers.device:
            raise RuntimeError(
                f"layer {layer.slot.name!r} ran on {x.device} but its AdaFisher factors live on "
                f"{layer.buffers.device}: create the optimizer after moving the model"
            )
        kind = layer.slot.kind
        if not has_samples(kind, x, output):  # an empty batch, an expert given no tokens
            self.seen_without_samples.add(layer.slot.name)  # fed nothing, by design
            return
        is_norm = kind is LayerKind.BATCHNORM or kind is LayerKind.LAYERNORM
        batch = batch_size(kind, x)
        norm_node = autograd_statistics.bias_gradient_node(module, output) if is_norm else None
        param = _accumulated_parameter(module)
        if not self._compiled_autograd_on() and _without_autocast_or_grad(
            x.device, self.backend.hook_commit, layer.buffers, layer.slot, module, x, output,
            batch, param, norm_node is not None,
        ):
            return  # the backend's native autograd hook commits the pass
        h_hat = _without_autocast_or_grad(x.device, self._input_statistic, kind, module, x, output)
        accumulator = _accumulator_of(param, output.grad_fn)
        if norm_node is not None:  # Ŝ from the bias gradient the norm's backward computes anyway
            norm_node.register_hook(
                functools.partial(self._on_norm_node, layer, module, h_hat, batch, accumulator)
            )
        else:
            output.register_hook(
                functools.partial(self._on_grad, layer, module, h_hat, batch, accumulator)
            )

    def _compiled_autograd_on(self) -> bool:
        """Whether a backward may run under compiled autograd, which traces Python hooks only
        (a backend's native hooks would refuse it): it is active now, or configured. The config
        is read once per optimizer step: a ConfigModule read costs ~40 µs per layer in a
        training step (cold caches), ~2 ms a step for ResNet-20."""
        compiled_autograd = sys.modules.get("torch._dynamo.compiled_autograd")
        if compiled_autograd is None:  # torch._dynamo was never imported
            return False
        if getattr(compiled_autograd, "compiled_autograd_enabled", False):
            return True
        step = self.schedule.factor_step
        if self._compiled_autograd_config is None or self._compiled_autograd_config[0] != step:
            configured = bool(sys.modules["torch._dynamo"].config.compiled_autograd)
            self._compiled_autograd_config = (step, configured)
        return self._compiled_autograd_config[1]

    def _input_statistic(self, kind: LayerKind, module, x: torch.Tensor, output: torch.Tensor):
        if kind is LayerKind.BATCHNORM:  # from the batch mean BatchNorm already computed
            h_hat = self.backend.batchnorm_input_statistic(module, output, x)
            if h_hat is not None:
                return h_hat
        return self.backend.input_statistic(kind, module, x)

    def _on_norm_node(self, layer: TrackedLayer, module, h_hat, batch, accumulator, grad_inputs,
                      grad_outputs):
        grad = autograd_statistics.bias_gradient(grad_inputs, layer.slot.s_len)
        self._on_grad(layer, module, h_hat, batch, accumulator,
                      grad_outputs[0] if grad is None else grad)

    def _on_grad(self, layer: TrackedLayer, module, h_hat, batch, accumulator,
                 grad: torch.Tensor) -> None:
        if not _accumulates(accumulator):
            return  # e.g. autograd.grad(loss, inputs): step() will not consume this pass
        _without_autocast_or_grad(
            grad.device, self.backend.commit_pass, layer.buffers, layer.slot, module, h_hat,
            grad, batch,
        )
        layer.buffers.has_pending = True


def _accumulated_parameter(module: nn.Module) -> torch.Tensor | None:
    """The layer's first trainable leaf parameter, whose gradient accumulation tells whether a
    backward counts for ``step()``; None when there is none to ask (unknown: commit)."""
    for name in ("weight", "bias"):
        p = getattr(module, name, None)
        if isinstance(p, torch.Tensor) and p.requires_grad:
            if p.grad_fn is not None:
                # computed on access (parametrizations, weight_norm): each access builds a new
                # node, never the one in this graph; the leaves are elsewhere
                continue
            if fsdp.is_sharded(p):
                # FSDP2 resharded the layer after its forward: the graph used the unsharded
                # copy, whose accumulator cannot be found from here (unknown: commit).
                return None
            return p
    return None


def _gradient_accumulator(module: nn.Module, node):
    """The autograd node that accumulates the gradient of ``_accumulated_parameter`` (as used by
    this forward), or None when there is none to ask. ``node`` is the grad_fn of the layer's
    output: a leaf parameter's accumulator is found a few edges below it, which costs far less
    than ``get_gradient_edge`` (a differentiable view per call)."""
    return _accumulator_of(_accumulated_parameter(module), node)


def _accumulator_of(p: torch.Tensor | None, node):
    """``_gradient_accumulator`` for the parameter ``_accumulated_parameter`` chose."""
    if p is None:
        return None
    found = _accumulator_below(node, p)
    if found is not None:
        return found
    try:  # used further down than the search goes
        return get_gradient_edge(p).node
    except RuntimeError:
        return None


_AccumulateGrad = torch._C._functions.AccumulateGrad


def _is_accumulator_of(node, param: torch.Tensor) -> bool:
    """Whether ``node`` is the AccumulateGrad of leaf ``param`` (in any graph: a leaf has one)."""
    return type(node) is _AccumulateGrad and node.variable is param


_SEARCH_DEPTH = 3  # Linear on 3-D input: View → Addmm → T → AccumulateGrad
_SEARCH_NODES = 16  # bounds the walk below nodes with many inputs (cat, stack)


def _accumulator_below(node, param: torch.Tensor):
    """The AccumulateGrad node of leaf ``param`` within a few edges below ``node``, or None."""
    frontier, visited = [node], 0
    for _ in range(_SEARCH_DEPTH):
        below = []
        for current in frontier:
            if current is None:
                continue
            for child, _ in current.next_functions:
                if child is None:
                    continue
                if _is_accumulator_of(child, param):
                    return child
                if type(child) is _AccumulateGrad:
                    continue  # another leaf's: nothing below it
                visited += 1
                if visited > _SEARCH_NODES:
                    return None
                below.append(child)
        frontier = below
    return None


_will_execute = getattr(torch._C, "_will_engine_execute_node", None)


def _accumulates(accumulator) -> bool:
    """Whether the running backward accumulates into the layer's parameter (unknown: yes)."""
    if accumulator is None or _will_execute is None:
        return True
    try:
        return bool(_will_execute(accumulator))
    except RuntimeError:
        return True


_MATMUL_INPUT = {"AddmmBackward0": "_saved_mat1", "MmBackward0": "_saved_self"}


@outside_compiled_graphs
def _projection_input(out: torch.Tensor, out_proj: nn.Linear) -> torch.Tensor | None:
    """The input autograd saved for ``out_proj``'s matmul, found a few nodes below the
    attention output (rows × in_features), or None if the graph has another layout."""
    weight = out_proj.weight
    if not weight.requires_grad:
        return None
    frontier, depth = [out.grad_fn], 0
    while frontier and depth < 4:
        nodes, frontier = frontier, []
        for node in nodes:
            if node is None:
                continue
            saved = _MATMUL_INPUT.get(type(node).__name__)
            if saved is not None and any(
                nxt is not None and type(nxt).__name__ == "TBackward0"
                and _is_accumulator_of(nxt.next_functions[0][0], weight)
                for nxt, _ in node.next_functions
            ):
                try:
                    x = getattr(node, saved, None)
                except RuntimeError:  # e.g. packed away by activation checkpointing
                    return None
                if isinstance(x, torch.Tensor) and x.shape[-1] == out_proj.in_features:
                    return x
                return None
            frontier.extend(nxt for nxt, _ in node.next_functions)
        depth += 1
    return None
