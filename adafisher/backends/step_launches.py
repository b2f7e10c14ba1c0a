"""The per-group step path's launches, shared by the native and Triton backends.

Under FSDP2 the optimizer steps each group's local shards through ``Backend.step`` (the planned
path, ``step_plan.py``, serves everything else). A group's parameters are split into one
fused-step op call per (device, factor buffer): a device holds one buffer per factor dtype.
Untracked parameters (F = 1) and empty shards join their device's first launch.
"""

from __future__ import annotations

import torch

from ..factors import FactorBuffers
from ..layers import FactorIndex
from .base import GroupStep


class StepLaunch:
    """The argument lists of one fused-step op call."""

    def __init__(self) -> None:
        self.buffers: FactorBuffers | None = None
        self.params: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self.exp_avgs: list[torch.Tensor] = []
        self.steps: list[int] = []
        self.layers: list[int] = []  # -1: no factors (F = 1)
        self.h_offsets: list[int] = []
        self.s_offsets: list[int] = []
        self.rows: list[int] = []

    def add(self, param, grad, exp_avg, step: int, index: FactorIndex | None) -> None:
        self.params.append(param)
        self.grads.append(grad)
        self.exp_avgs.append(exp_avg)
        self.steps.append(step)
        self.layers.append(-1 if index is None else index.layer)
        self.h_offsets.append(0 if index is None else index.h_offset)
        self.s_offsets.append(0 if index is None else index.s_offset)
        self.rows.append(1 if index is None else index.rows)

    def run(self, op, device: torch.device, group: GroupStep) -> None:
        """Call ``op`` (a fused-step op: ``adafisher::fused_step`` or its Triton twin)."""
        if self.buffers is not None:
            factors, blended = self.buffers.factors, self.buffers.blended
        else:
            factors = torch.empty(0, device=device)
            blended = torch.empty(0, device=device, dtype=torch.bool)
        # The op counts the step itself: it gets the counts before this step.
        steps = _on_device([s - 1 for s in self.steps], torch.float32, device).unbind()
        lr = _on_device([group.lr], torch.float64, device)[0]
        op(self.params, self.grads, self.exp_avgs, list(steps), factors, blended, self.layers,
           self.h_offsets, self.s_offsets, self.rows, lr, group.beta, group.damping,
           group.weight_decay, group.decoupled, group.maximize)


def group_launches(group: GroupStep) -> dict[tuple[torch.device, int | None], StepLaunch]:
    """``group``'s parameters as launches keyed by (device, id of their factor buffer)."""
    first: dict[torch.device, int] = {}
    for i, param in enumerate(group.params):
        if group.indices[i] is not None and param.numel() > 0:
            first.setdefault(param.device, id(group.buffers[i]))
    launches: dict[tuple[torch.device, int | None], StepLaunch] = {}
    for i, param in enumerate(group.params):
        index, buffers = group.indices[i], group.buffers[i]
        tracked = index is not None and param.numel() > 0  # an empty shard has no rows of S
        key = (param.device, id(buffers) if tracked else first.get(param.device))
        launch = launches.get(key)
        if launch is None:
            launch = launches[key] = StepLaunch()
        if tracked:
            launch.buffers = buffers
        launch.add(param, group.grads[i], group.exp_avgs[i], group.steps[i],
                   index if tracked else None)
    return launches


def _on_device(values: list[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` on ``device``; on CUDA through pinned memory, without waiting."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)
