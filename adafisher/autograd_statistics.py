"""BatchNorm / LayerNorm statistics from what autograd has already computed.

The norm layers' statistics are batch *sums* (docs/algorithm.md §2), which their own
forward and backward compute anyway: in training mode BatchNorm saves the per-channel batch
mean on its autograd node (Σ_{b,t} x = mean·B·T), and the gradient the node produces for the
bias is Σ g over every
non-channel dim, exactly what Ŝ squares. Reading them saves a pass over the activation and one
over its gradient per norm layer. Only nodes known to have this layout are used; anything else
(eval-mode BatchNorm, compiled graphs, frozen biases, other kernels) returns None and the
caller computes the statistics from the tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from . import statistics

_BATCHNORM_NODES = {
    "NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0",
}
_NORM_NODES = _BATCHNORM_NODES | {"NativeLayerNormBackward0"}
_BIAS_INPUT = 2  # the node's inputs are (input, weight, bias)


def bias_gradient_node(module: nn.Module, output: torch.Tensor):
    """The autograd node whose gradient for the layer's bias is this pass's Σ g, or None."""
    bias = getattr(module, "bias", None)
    node = output.grad_fn
    if bias is None or not bias.requires_grad or node is None:
        return None
    if type(node).__name__ not in _NORM_NODES:
        return None
    edges = node.next_functions  # built on every access: read once
    if len(edges) <= _BIAS_INPUT or edges[_BIAS_INPUT][0] is None:
        return None
    return node


def bias_gradient(grad_inputs: tuple, n_out: int) -> torch.Tensor | None:
    """From a norm node hook's ``grad_inputs``: Σ g as a batch-of-one "output gradient"
    ``(1, *bias.shape)`` whose statistic (summed over the batch, squared, / B) is the layer's
    Ŝ; None if it is not there."""
    grad = grad_inputs[_BIAS_INPUT] if len(grad_inputs) > _BIAS_INPUT else None
    if grad is None or grad.numel() != n_out:
        return None
    return grad.unsqueeze(0)


def batchnorm_input_statistic(output: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """BatchNorm's Ĥ from its saved batch mean, or None."""
    sums = batchnorm_channel_sums(output, x)
    if sums is None:
        return None
    shape = x.shape if x.dim() >= 2 else (1, *x.shape)
    return statistics.batchnorm_input_statistic_from_sums(sums, shape)


def batchnorm_channel_sums(output: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    """Σ_{b,t} x per channel from the batch mean BatchNorm saved in training mode, or None."""
    saved = batchnorm_saved_mean(output, x)
    if saved is None:
        return None
    mean, count = saved
    return mean.to(statistics.accumulation_dtype(mean)) * count


def batchnorm_saved_mean(output: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """``(batch mean per channel, elements per channel)`` BatchNorm saved in training mode, or
    None."""
    node = output.grad_fn
    if node is None or type(node).__name__ not in _BATCHNORM_NODES:
        return None
    mean = getattr(node, "_saved_result1", None)
    channels = x.shape[1] if x.dim() >= 2 else x.shape[0]
    if not isinstance(mean, torch.Tensor) or mean.numel() != channels:
        return None  # eval mode saves no batch mean
    return mean, x.numel() // channels
