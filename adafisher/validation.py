"""Hyperparameter checks: at construction, and again at ``step()`` for values changed since.

Param groups are plain dicts that users and LR schedulers edit between steps, so a value is
only known to be valid when ``step()`` reads it. ``GroupChecker`` re-validates a group only
when its values changed (one tuple comparison per group and step otherwise).
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Any

import torch

GROUP_HYPERPARAMETERS = ("lr", "beta", "damping", "weight_decay", "maximize")
_BETA = 1  # positions in GroupChecker's value tuples
_MOMENTUM = len(GROUP_HYPERPARAMETERS)
# torch.optim group keys AdaFisher does not implement: refused rather than silently ignored.
UNSUPPORTED_GROUP_KEYS = {
    "foreach": "AdaFisher chooses its implementation with `backend`",
    "fused": "AdaFisher chooses its implementation with `backend`",
    "capturable": "it needs backend='native' or 'triton', whose step counts and lr live on "
    "the device (the torch backend reads step counts on the host)",
    "differentiable": "the step is not differentiable",
}
_CAPTURABLE = _MOMENTUM + 1 + list(UNSUPPORTED_GROUP_KEYS).index("capturable")


def check_number(
    name: str, value: Any, low: float, high: float, *, low_open: bool = False,
    high_open: bool = False,
) -> None:
    """A finite real number in the interval; TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    low_ok = value > low if low_open else value >= low
    high_ok = value < high if high_open else value <= high
    if not (low_ok and high_ok):
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {left}{low}, {high}{right}, got {value}")


def check_group_hyperparameters(group: dict[str, Any]) -> None:
    """docs/algorithm.md §6: lr and weight_decay finite ≥ 0, damping finite > 0, beta in [0, 1)."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):  # a device lr (capturable steps); read once per change
        if lr.numel() != 1 or not lr.is_floating_point():
            raise TypeError(f"a tensor lr must hold one floating-point value, got {lr!r}")
        lr = lr.item()
    check_number("lr", lr, 0.0, math.inf)
    check_number("beta", group["beta"], 0.0, 1.0, high_open=True)
    check_number("damping", group["damping"], 0.0, math.inf, low_open=True)
    check_number("weight_decay", group["weight_decay"], 0.0, math.inf)
    if not isinstance(group.get("maximize", False), bool):
        raise TypeError(f"maximize must be a bool, got {type(group['maximize']).__name__}")


def check_group_keys(group: dict[str, Any], capturable_ok: bool = False) -> None:
    for key, reason in UNSUPPORTED_GROUP_KEYS.items():
        # torch.compile marks every group capturable while it traces a step; that is not the
        # user asking for CUDA-graph capture.
        if key == "capturable" and (capturable_ok or torch.compiler.is_compiling()):
            continue
        if group.get(key):
            raise ValueError(f"param group option {key}=True is not supported: {reason}")


_TRACED_LR = "<float lr of a traced step>"  # stands for the lr in GroupChecker's values there


def _traced_view(values: tuple, group: dict[str, Any]) -> tuple:
    """GroupChecker's values as a traced step compares them: a float lr masked, and
    ``capturable`` (which torch.compile sets on every group while it traces) left out."""
    lr = values[0] if isinstance(group["lr"], torch.Tensor) else _TRACED_LR
    return (lr, *values[1:_CAPTURABLE], None, *values[_CAPTURABLE + 1:])


def _check_traced_lr(lr: Any) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"lr must be a real number, got {type(lr).__name__}")
    # NaN fails both, +inf the second. (Under torch.compile the message must be a constant
    # defined here: it cannot show the value.)
    torch._check(lr >= 0, lambda: "lr must be a finite number >= 0")
    torch._check(lr <= sys.float_info.max, lambda: "lr must be a finite number >= 0")


class GroupChecker:
    """Validates param groups at ``step()``, once per change of their values.

    It also keeps ``momentum`` (written by ``OneCycleLR``/``CyclicLR`` with
    ``cycle_momentum=True``) and ``beta`` in step: whichever changed since the last step wins.
    """

    def __init__(self) -> None:
        self._seen: dict[int, tuple] = {}  # id(group) → its last validated values

    @staticmethod
    def _values(group: dict[str, Any]) -> tuple:
        return (
            *(group.get(k) for k in GROUP_HYPERPARAMETERS),
            group.get("momentum"),
            *(group.get(k) for k in UNSUPPORTED_GROUP_KEYS),
        )

    def check(self, groups: list[dict[str, Any]], capturable_ok: bool = False) -> None:
        """Raises before anything is changed if any group is invalid; ``capturable_ok``: the
        backend's step can be captured in a CUDA graph."""
        traced = torch.compiler.is_compiling()
        updates = []
        for group in groups:
            values = self._values(group)
            seen = self._seen.get(id(group))
            if traced:
                # A traced step keeps a float lr symbolic (an LR schedule does not recompile
                # it): comparing or range-checking its value in Python would guard on it. It is
                # checked by torch._check instead (RuntimeError), the rest as in eager.
                if not isinstance(group["lr"], torch.Tensor):
                    _check_traced_lr(group["lr"])
                values = _traced_view(values, group)
                seen = None if seen is None else _traced_view(seen, group)
            if values == seen:
                continue
            candidate = dict(group)
            if traced and values[0] is _TRACED_LR:
                candidate["lr"] = 0.0  # checked above
            momentum = group.get("momentum")
            if momentum is not None:
                beta_changed = seen is not None and group["beta"] != seen[_BETA]
                momentum_changed = seen is None or momentum != seen[_MOMENTUM]
                if momentum_changed and beta_changed and momentum != group["beta"]:
                    raise ValueError(
                        "param group's 'beta' and its alias 'momentum' were both changed, to "
                        f"different values ({group['beta']} and {momentum})"
                    )
                candidate["beta"] = momentum if momentum_changed else group["beta"]
            check_group_keys(candidate, capturable_ok)
            check_group_hyperparameters(candidate)
            updates.append((group, candidate))
        for group, candidate in updates:
            if group.get("momentum") is not None:
                group["beta"] = group["momentum"] = candidate["beta"]
            values = self._values(group)
            # (an eager step checks the masked values again)
            self._seen[id(group)] = _traced_view(values, group) if traced else values
        if len(self._seen) > len(groups):  # groups replaced (load_state_dict): forget the old
            live = {id(group) for group in groups}
            self._seen = {k: v for k, v in self._seen.items() if k in live}
