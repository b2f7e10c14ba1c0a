"""Layer hooks that feed fresh statistics into the pending buffer (SPEC §4).

A forward hook computes Ĥ from the layer's input and registers a hook on the layer's *output
tensor*; that tensor hook receives the gradient of the output, computes Ŝ and commits the pass.
Unlike module full-backward hooks, a tensor hook keeps working when an in-place op follows the
layer (``ReLU(inplace=True)``, ``out += identity``): it sees the gradient of the pre-in-place
value. A pass whose backward never reaches the layer commits nothing.

The hooks reference this collector, never the optimizer, so a model does not keep its
optimizer alive (and the optimizer removes the hooks when it is collected).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import autograd_statistics
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
    bf16. Contexts are entered only when needed: hooks run on every layer of every pass."""
    if _autocast_enabled(device.type):
        with torch.autocast(device_type=device.type, enabled=False), torch.no_grad():
            return fn(*args)
    if torch.is_grad_enabled():
        with torch.no_grad():
            return fn(*args)
    return fn(*args)


class StatisticsCollector:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.collecting = True  # set by the optimizer: does the coming step take statistics?
        self._handles: list[RemovableHandle] = []

    def track(self, module: nn.Module, layer: TrackedLayer) -> None:
        hook = functools.partial(self._on_forward, layer)
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

    # Under torch.compile the checks above are traced (a step without statistics keeps one
    # whole graph); gathering statistics runs eagerly, outside the graph, instead of being
    # retraced for every layer.
    @torch.compiler.disable
    def _collect(self, layer: TrackedLayer, module, x: torch.Tensor, output: torch.Tensor) -> None:
        if x.device != layer.buffers.device:
            raise RuntimeError(
                f"layer {layer.slot.name!r} ran on {x.device} but its AdaFisher factors live on "
                f"{layer.buffers.device}: create the optimizer after moving the model"
            )
        kind = layer.slot.kind
        if not has_samples(kind, x, output):  # an empty batch, an expert given no tokens
            return
        is_norm = kind is LayerKind.BATCHNORM or kind is LayerKind.LAYERNORM
        h_hat = None
        if kind is LayerKind.BATCHNORM:  # from the batch mean BatchNorm already computed
            h_hat = _without_autocast_or_grad(
                x.device, self.backend.batchnorm_input_statistic, module, output, x
            )
        if h_hat is None:
            h_hat = _without_autocast_or_grad(
                x.device, self.backend.input_statistic, kind, module, x
            )
        batch = batch_size(kind, x)
        node = autograd_statistics.bias_gradient_node(module, output) if is_norm else None
        if node is not None:  # Ŝ from the bias gradient the norm's backward computes anyway
            node.register_hook(functools.partial(self._on_norm_node, layer, module, h_hat, batch))
        else:
            output.register_hook(functools.partial(self._on_grad, layer, module, h_hat, batch))

    def _on_norm_node(self, layer: TrackedLayer, module, h_hat, batch, grad_inputs, grad_outputs):
        grad = autograd_statistics.bias_gradient(grad_inputs, layer.slot.s_len)
        self._on_grad(layer, module, h_hat, batch, grad_outputs[0] if grad is None else grad)

    def _on_grad(self, layer: TrackedLayer, module, h_hat, batch, grad: torch.Tensor) -> None:
        _without_autocast_or_grad(
            grad.device, self.backend.commit_pass, layer.buffers, layer.slot, module, h_hat,
            grad, batch,
        )
        layer.buffers.has_pending = True
