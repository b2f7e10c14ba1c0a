"""The AdaFisher / AdaFisherW update rules in plain PyTorch (docs/algorithm.md §6), one
parameter at a time.

Kept apart from the optimizer front-end, like ``torch.optim``'s functional implementations: the
front-end decides what to update and with which preconditioner, these functions do the math.
"""

from __future__ import annotations

import torch


def compute_dtype(param: torch.Tensor) -> torch.dtype:
    """fp32 math for fp16/bf16/fp32 parameters; float64 ones stay float64."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def preconditioner(
    s_rows: torch.Tensor, h_cols: torch.Tensor, damping: float, shape: torch.Size
) -> torch.Tensor:
    """``F[r, c] = S[r]·H[c] + damping``, laid out like the parameter (docs/algorithm.md §5)."""
    return torch.outer(s_rows, h_cols).add_(damping).view(shape)


def adafisher_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    step: int,
    fisher: torch.Tensor | None,
    *,
    lr: float,
    beta: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool = False,
) -> None:
    """One update of ``param`` and its first moment ``exp_avg`` in place.

    ``fisher`` is F laid out like the parameter, or None for F = 1 (untracked parameters and
    layers without factors yet); ``step`` is this parameter's step count t, from 1.
    """
    dtype = compute_dtype(param)
    p = param if param.dtype == dtype else param.to(dtype)
    m = exp_avg if exp_avg.dtype == dtype else exp_avg.to(dtype)
    g = grad.to(dtype)
    if maximize:
        g = -g  # before weight decay, as torch.optim does
    if weight_decay != 0 and not decoupled:
        g = g.add(p, alpha=weight_decay)  # L2: g ← g + wd·p (never touches .grad)
    m.mul_(beta).add_(g, alpha=1 - beta)
    step_size = lr / (1 - beta**step)
    if weight_decay != 0 and decoupled:
        p.mul_(1 - lr * weight_decay)  # p − lr·wd·p, with p before this step's update
    if fisher is None:
        p.add_(m, alpha=-step_size)
    else:
        p.addcdiv_(m, fisher, value=-step_size)
    if p is not param:
        param.copy_(p)
    if m is not exp_avg:
        exp_avg.copy_(m)
