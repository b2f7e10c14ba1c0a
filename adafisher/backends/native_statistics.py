"""Fresh statistics Ĥ and Ŝ (docs/algorithm.md §2) through the ``adafisher`` statistics ops
(``adafisher/statistic_ops.py``), served on CPU by ``csrc/cpu_statistics.cpp``.

The same contract as ``adafisher.statistics`` (the reference, which the torch backend runs):
``input_statistic`` returns Ĥ of one forward pass; ``commit_pass`` adds the pass's Ĥ and Ŝ into
the layer's slices of the flat pending buffer and +1 into its pass count, in one op. Each verb
is one op per layer and pass; the conv Ĥ reads the activation once, without a squared copy.
``register_commit_hook`` is the hooks' fast path: the commit runs from a C++ autograd hook
(``csrc/commit_hooks.cpp``), with no Python in the backward pass.
Conv layers with another padding mode than zeros take the reference path.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import autograd_statistics, statistics
from ..factors import FactorBuffers, LayerSlot
from ..layers import LayerKind

_ops = torch.ops.adafisher


def _batch_first(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() >= 2 else x.unsqueeze(0)


def _conv_arguments(module: nn.modules.conv._ConvNd) -> tuple:
    """``(kernel_size, stride, dilation, pad_before, pad_after, groups, bias)`` of the op."""
    pads = module._reversed_padding_repeated_twice  # (last dim before, last dim after, …)
    n = len(module.kernel_size)
    pad_before = [pads[2 * (n - 1 - d)] for d in range(n)]
    pad_after = [pads[2 * (n - 1 - d) + 1] for d in range(n)]
    return (list(module.kernel_size), list(module.stride), list(module.dilation), pad_before,
            pad_after, module.groups, module.bias is not None)


def input_statistic(kind: LayerKind, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if kind is LayerKind.LINEAR:
        width = module.in_features
        rows = x.numel() // width if width else math.prod(x.shape[:-1])
        return _ops.channel_sum_of_squares(x, x.dim() - 1, x.dim(), 1.0 / rows,
                                           module.bias is not None)
    if kind is LayerKind.CONV:
        if module.padding_mode != "zeros":  # reflected/replicated/circular counts: reference
            return statistics.conv_input_statistic(module, x)
        if x.dim() == len(module.kernel_size) + 1:  # unbatched input
            x = x.unsqueeze(0)
        return _ops.conv_input_statistic(x, *_conv_arguments(module))
    x = _batch_first(x)
    batch = x.shape[0]
    if kind is LayerKind.BATCHNORM:
        positions = math.prod(x.shape[2:])
        scale = 1.0 / (positions**4 * batch**2)  # (Σ/T²)² summed, then / B²
        return _ops.norm_input_statistic(x, 1, 2, scale, x.shape[1] / batch**2)
    divisor = math.prod(x.shape[2:])  # LayerNorm: the reduced dims other than the batch
    scale = 1.0 / (divisor**4 * batch**2)
    return _ops.norm_input_statistic(x, 1, 2, scale, x.shape[1] / batch**2)


def batchnorm_input_statistic(output: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """BatchNorm's Ĥ from the batch mean its autograd node saved (Σ x = mean · count), or None."""
    source = batchnorm_input_source(output, x)
    if source is None:
        return None
    mean, scale, second = source
    return _ops.norm_input_statistic(mean, 0, 1, scale, second)


def batchnorm_input_source(output: torch.Tensor,
                           x: torch.Tensor) -> tuple[torch.Tensor, float, float] | None:
    """``(saved batch mean, scale, second)``: BatchNorm's Ĥ is
    ``norm_input_statistic(mean, 0, 1, scale, second)``; None when no mean was saved."""
    saved = autograd_statistics.batchnorm_saved_mean(output, x)
    if saved is None:
        return None
    mean, count = saved
    shape = _batch_first(x).shape
    batch, positions = shape[0], math.prod(shape[2:])
    return mean, count**2 / (positions**4 * batch**2), shape[1] / batch**2


def commit_arguments(kind: LayerKind, module: nn.Module, grad: torch.Tensor,
                     batch: int) -> tuple[int, int, bool, float]:
    """``(channel_start, channel_end, sum_then_square, scale)`` of ``commit_statistics`` for an
    output gradient shaped like ``grad`` (the layer's output: the gradient has its shape)."""
    if kind is LayerKind.LINEAR:
        width = module.out_features
        rows = grad.numel() // width if width else math.prod(grad.shape[:-1])
        return grad.dim() - 1, grad.dim(), False, 1.0 / rows
    if kind is LayerKind.CONV:
        start = 0 if grad.dim() == len(module.kernel_size) + 1 else 1  # unbatched: C first
        return start, start + 1, False, grad.shape[start] / grad.numel()
    if kind is LayerKind.BATCHNORM:
        start = 1 if grad.dim() >= 2 else 0
        return start, start + 1, True, 1.0 / batch
    # LayerNorm: Σ over the leading, non-normalized dims
    return grad.dim() - len(module.normalized_shape), grad.dim(), True, 1.0 / batch


def register_commit_hook(register, buffers: FactorBuffers, slot: LayerSlot, module: nn.Module,
                         output: torch.Tensor, batch: int, param: torch.Tensor | None,
                         from_norm_node: bool, h_hat: torch.Tensor | None,
                         h_source: tuple[torch.Tensor, float, float] | None) -> bool:
    """Hook a C++ autograd hook (``register``: ``adafisher._C.register_commit_hook``) that
    commits this pass with ``commit_statistics`` when the gradient of ``output`` arrives
    (``from_norm_node``: from the bias gradient of the norm node that produced ``output``).
    Ĥ is ``h_hat``, or formed at commit time from ``h_source`` (``batchnorm_input_source``).
    False: not hooked (``output`` has no grad_fn)."""
    source = (None, 0.0, 0.0) if h_source is None else h_source
    start, end, sum_then_square, scale = commit_arguments(slot.kind, module, output, batch)
    return register(output, from_norm_node, buffers.pending, buffers.pending_count, h_hat,
                    *source, slot.index, slot.h_offset, slot.s_offset, start, end,
                    sum_then_square, scale, slot.s_len, param)


def commit_pass(buffers: FactorBuffers, slot: LayerSlot, module: nn.Module, h_hat: torch.Tensor,
                grad: torch.Tensor, batch: int) -> None:
    start, end, sum_then_square, scale = commit_arguments(slot.kind, module, grad, batch)
    _ops.commit_statistics(buffers.pending, buffers.pending_count, h_hat, grad, slot.index,
                           slot.h_offset, slot.s_offset, start, end, sum_then_square, scale)
