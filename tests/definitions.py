"""SPEC §2–6 written as plainly as possible, in float64, for the tests to check against.

Nothing here is shared with the package: the conv statistic is built on F.unfold, the blend and
update rules are the SPEC's formulas term by term.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-6


def linear_h(x: torch.Tensor, has_bias: bool) -> torch.Tensor:
    rows = x.double().reshape(-1, x.shape[-1])
    h = (rows**2).mean(0)
    return torch.cat([h, torch.ones(1, dtype=h.dtype)]) if has_bias else h


def linear_s(g: torch.Tensor) -> torch.Tensor:
    rows = g.double().reshape(-1, g.shape[-1])
    return (rows**2).mean(0)


def _pad_for(conv: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """x padded the way the conv pads it (all padding modes, 'same' split included)."""
    pads = list(conv._reversed_padding_repeated_twice)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, pads, mode=mode) if any(pads) else x


def conv_h(conv: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """Per patch element (c, k…): mean over batch, output positions and groups of the squared
    input the element sees — via an explicit im2col (unfold) of the padded input."""
    nd = len(conv.kernel_size)
    if x.dim() == nd + 1:
        x = x.unsqueeze(0)
    x = _pad_for(conv, x.double())
    batch, groups = x.shape[0], conv.groups
    per_group = conv.in_channels // groups
    if nd == 1:  # unfold is 2-D only: treat 1-D as (1, L)
        x = x.unsqueeze(2)
        kernel, dilation, stride = (1, *conv.kernel_size), (1, *conv.dilation), (1, *conv.stride)
    elif nd == 2:
        kernel, dilation, stride = conv.kernel_size, conv.dilation, conv.stride
    else:
        return _conv3d_h(conv, x)
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (B, C·k, P)
    cols = cols.reshape(batch, groups, per_group * math.prod(kernel), -1)
    h = (cols**2).mean(dim=(0, 1, 3))
    if conv.bias is not None:
        h = torch.cat([h, torch.ones(1, dtype=h.dtype)])
    return h


def _conv3d_h(conv: nn.Conv3d, xp: torch.Tensor) -> torch.Tensor:
    """3-D patches by explicit strided slicing of the padded input (unfold has no 3-D form)."""
    kd, kh, kw = conv.kernel_size
    (sd, sh, sw), (dd, dh, dw) = conv.stride, conv.dilation
    batch, groups = xp.shape[0], conv.groups
    per_group = conv.in_channels // groups
    od = (xp.shape[2] - dd * (kd - 1) - 1) // sd + 1
    oh = (xp.shape[3] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[4] - dw * (kw - 1) - 1) // sw + 1
    h = torch.zeros(per_group, kd, kh, kw, dtype=torch.float64)
    for a in range(kd):
        for b in range(kh):
            for c in range(kw):
                patch = xp[
                    :, :,
                    a * dd : a * dd + sd * (od - 1) + 1 : sd,
                    b * dh : b * dh + sh * (oh - 1) + 1 : sh,
                    c * dw : c * dw + sw * (ow - 1) + 1 : sw,
                ]
                per_channel = (patch**2).reshape(batch, groups, per_group, -1)
                h[:, a, b, c] = per_channel.mean(dim=(0, 1, 3))
    h = h.reshape(-1)
    if conv.bias is not None:
        h = torch.cat([h, torch.ones(1, dtype=h.dtype)])
    return h


def conv_s(conv: nn.modules.conv._ConvNd, g: torch.Tensor) -> torch.Tensor:
    if g.dim() == len(conv.kernel_size) + 1:
        g = g.unsqueeze(0)
    g = g.double().transpose(0, 1).reshape(g.shape[1], -1)
    return (g**2).mean(1)


def batchnorm_h(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    batch, channels = x.shape[0], x.shape[1]
    positions = math.prod(x.shape[2:])
    s = torch.stack([x[:, c].sum() / positions**2 for c in range(channels)])
    return torch.stack([(s**2).sum(), torch.tensor(float(channels), dtype=s.dtype)]) / batch**2


def batchnorm_s(g: torch.Tensor, batch: int) -> torch.Tensor:
    g = g.double()
    return torch.stack([g[:, c].sum() ** 2 for c in range(g.shape[1])]) / batch


def layernorm_h(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    batch = x.shape[0]
    other = [d for d in range(x.dim()) if d != 1]
    divisor = math.prod(x.shape[d] for d in other[1:])
    s = x.sum(dim=other) / divisor**2
    return torch.stack([(s**2).sum(), torch.tensor(float(len(s)), dtype=s.dtype)]) / batch**2


def layernorm_s(g: torch.Tensor, normalized_ndim: int, batch: int) -> torch.Tensor:
    g = g.double()
    lead = tuple(range(g.dim() - normalized_ndim))
    return (g.sum(dim=lead) ** 2).reshape(-1) / batch


def blend(factor: torch.Tensor, fresh: torch.Tensor, gammas: tuple[float, float]) -> torch.Tensor:
    """SPEC §3 steps 2–3 (the caller handles step 1, non-finite statistics)."""
    normalized = (fresh - fresh.min()) / (fresh.max() - fresh.min() + EPS)
    return (1 - gammas[0]) * factor + gammas[1] * normalized


def update(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    t: int,
    fisher: torch.Tensor | float,
    *,
    lr: float,
    beta: float,
    weight_decay: float,
    decoupled: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC §6, literally; returns the new (p, m)."""
    if decoupled:
        m = beta * m + (1 - beta) * g
        return p - lr * (m / (1 - beta**t) / fisher + weight_decay * p), m
    g = g + weight_decay * p
    m = beta * m + (1 - beta) * g
    return p - (lr / (1 - beta**t)) * m / fisher, m
