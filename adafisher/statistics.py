"""Fresh statistics Ĥ (from a layer's input) and Ŝ (from its output gradient), docs/algorithm.md §2.

Plain PyTorch, fp32 accumulation whatever the activation dtype. These are the reference the
fused kernels are tested against, and the torch backend's implementation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .conv_statistics import (
    accumulation_dtype,
    batch_sum_of_squares,
    conv_input_statistic,
    conv_output_statistic,
)
from .layers import LayerKind


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """``(N, width)`` rows of t (N counted explicitly: ``reshape(-1, 0)`` is ambiguous)."""
    return t.reshape(math.prod(t.shape[:-1]), width)


def linear_input_statistic(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = _rows(x, module.in_features)
    h = batch_sum_of_squares(rows) / rows.shape[0]
    if module.bias is not None:
        h = torch.cat([h, h.new_ones(1)])
    return h


def linear_output_statistic(module: nn.Linear, g: torch.Tensor) -> torch.Tensor:
    rows = _rows(g, module.out_features)
    return batch_sum_of_squares(rows) / rows.shape[0]


def _batch_first(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() >= 2 else x.unsqueeze(0)


def _pair(first: torch.Tensor, second: float) -> torch.Tensor:
    """``[first, second]`` as one fp32 vector (first is a 0-d tensor)."""
    return torch.cat([first.reshape(1), first.new_full((1,), second)])


def _sum_except_channels(x: torch.Tensor) -> torch.Tensor:
    """Per-channel (dim 1) sums in fp32, reduced in place of a transposed copy."""
    return x.sum(dim=[d for d in range(x.dim()) if d != 1], dtype=accumulation_dtype(x))


def batchnorm_input_statistic(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = _batch_first(x)
    return batchnorm_input_statistic_from_sums(_sum_except_channels(x), x.shape)


def batchnorm_input_statistic_from_sums(sums: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Ĥ of BatchNorm from the per-channel sums Σ_{b,t} x of an input of ``shape``."""
    batch, channels = shape[0], shape[1]
    positions = math.prod(shape[2:])
    scale = 1.0 / (positions**4 * batch**2)  # (Σ/T²)² summed, then / B²
    return _pair(torch.dot(sums, sums) * scale, channels / batch**2)


def batchnorm_output_statistic(module: nn.Module, g: torch.Tensor, batch: int) -> torch.Tensor:
    return _sum_except_channels(_batch_first(g)).square_().mul_(1.0 / batch)


def layernorm_input_statistic(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    x = _batch_first(x)
    batch = x.shape[0]
    reduced = [d for d in range(x.dim()) if d != 1]
    divisor = 1
    for d in reduced[1:]:
        divisor *= x.shape[d]
    s = x.sum(reduced, dtype=accumulation_dtype(x))
    scale = 1.0 / (divisor**4 * batch**2)
    return _pair(torch.dot(s, s) * scale, s.numel() / batch**2)


def layernorm_output_statistic(module: nn.LayerNorm, g: torch.Tensor, batch: int) -> torch.Tensor:
    n_norm = len(module.normalized_shape)
    lead = list(range(g.dim() - n_norm))
    sums = g.sum(lead, dtype=accumulation_dtype(g)) if lead else g.to(accumulation_dtype(g))
    return sums.reshape(-1).square() / batch


def has_samples(kind: LayerKind, x: torch.Tensor, output: torch.Tensor) -> bool:
    """Whether a pass carries samples (docs/algorithm.md §4: a pass with zero samples adds nothing).

    Linear: rows of x (a zero-width layer, ``Linear(0, n)`` or ``Linear(n, 0)``, still has
    rows); conv: output positions over the batch; norm layers: elements of x."""
    if kind is LayerKind.LINEAR:
        return math.prod(x.shape[:-1]) > 0
    if kind is LayerKind.CONV:
        return output.numel() > 0
    return x.numel() > 0


def batch_size(kind: LayerKind, x: torch.Tensor) -> int:
    """B of docs/algorithm.md §2 (first dim; 1 for unbatched inputs)."""
    if kind is LayerKind.CONV or kind is LayerKind.LINEAR:
        return x.shape[0] if x.dim() >= 2 else 1
    return _batch_first(x).shape[0]


def input_statistic(kind: LayerKind, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if kind is LayerKind.LINEAR:
        return linear_input_statistic(module, x)
    if kind is LayerKind.CONV:
        return conv_input_statistic(module, x)
    if kind is LayerKind.BATCHNORM:
        return batchnorm_input_statistic(module, x)
    return layernorm_input_statistic(module, x)


def output_statistic(
    kind: LayerKind, module: nn.Module, g: torch.Tensor, batch: int
) -> torch.Tensor:
    if kind is LayerKind.LINEAR:
        return linear_output_statistic(module, g)
    if kind is LayerKind.CONV:
        return conv_output_statistic(module, g)
    if kind is LayerKind.BATCHNORM:
        return batchnorm_output_statistic(module, g, batch)
    return layernorm_output_statistic(module, g, batch)
