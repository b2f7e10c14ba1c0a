"""Which layers AdaFisher tracks, how large their factors are, and how each parameter reads them.

This is the one place that knows about layer types (docs/algorithm.md §2 and §5). Adding a
layer type means adding a ``LayerKind`` here and its statistics in ``statistics.py``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from torch import nn


class LayerKind(str, enum.Enum):
    LINEAR = "linear"
    CONV = "conv"
    BATCHNORM = "batchnorm"
    LAYERNORM = "layernorm"


@dataclass(frozen=True)
class FactorIndex:
    """How one parameter reads its layer's factors: viewed as ``(rows, cols)``,
    ``F[r, c] = S[s_offset + r] * H[h_offset + c] + damping`` (offsets into the flat buffer)."""

    layer: int
    rows: int
    cols: int
    h_offset: int
    s_offset: int


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The kind of a supported layer, recognised by ``isinstance`` (subclasses count)."""
    if isinstance(module, nn.Linear):
        return LayerKind.LINEAR
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return LayerKind.CONV
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
        return LayerKind.BATCHNORM
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        return LayerKind.LAYERNORM
    return None


def factor_sizes(kind: LayerKind, module: nn.Module) -> tuple[int, int]:
    """``(len(H), len(S))`` for a supported layer."""
    has_bias = getattr(module, "bias", None) is not None
    if kind is LayerKind.LINEAR:
        return module.in_features + int(has_bias), module.out_features
    if kind is LayerKind.CONV:
        patch = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        return patch + int(has_bias), module.out_channels
    if kind is LayerKind.BATCHNORM:
        return 2, module.num_features
    return 2, math.prod(module.normalized_shape)


def parameter_roles(kind: LayerKind, module: nn.Module) -> dict[str, tuple[int, int, int]]:
    """For each parameter attribute of the layer: ``(rows, cols, h_position)``; ``h_position``
    is the index into H of the first column this parameter reads."""
    h_len, s_len = factor_sizes(kind, module)
    roles: dict[str, tuple[int, int, int]] = {}
    if kind in (LayerKind.LINEAR, LayerKind.CONV):
        has_bias = module.bias is not None
        roles["weight"] = (s_len, h_len - int(has_bias), 0)
        if has_bias:
            roles["bias"] = (s_len, 1, h_len - 1)
    else:
        roles["weight"] = (s_len, 1, 0)
        if getattr(module, "bias", None) is not None:
            roles["bias"] = (s_len, 1, 1)
    return roles
