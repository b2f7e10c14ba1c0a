"""The native backend: the factor update and the step through the ``adafisher`` ops
(``adafisher/ops.py``), served by the compiled kernels of ``adafisher._C`` (``csrc/``).

One ``fused_step`` call per (group, device, factor buffer) and one ``update_factors`` call per
device. The statistics of the forward/backward passes go through the statistics ops
(``native_statistics.py``): one op per layer in the forward pass, one in the backward.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .. import ops
from ..factors import FactorBuffers, LayerSlot
from ..layers import LayerKind
from ..step_plan import StepPlan
from . import native_statistics
from .base import GroupStep
from .step_launches import group_launches
from .torch_backend import NORMALIZATION_EPS, TorchBackend


def usable_on(devices: Iterable[torch.device]) -> bool:
    """Whether the compiled kernels serve every device in ``devices``."""
    devices = set(devices)
    return bool(devices) and all(ops.native_available(d.type) for d in devices)


class NativeBackend(TorchBackend):
    name = "native"

    def __init__(self) -> None:
        # (buffers, layer count, its segment offsets on its device), rebuilt only when layers
        # are added. A list searched by identity: FactorBuffers is unhashable.
        self._segment_offsets: list[tuple[FactorBuffers, int, torch.Tensor]] = []
        # The C++ hook that commits a pass without Python in the backward (csrc/commit_hooks.cpp)
        self._register_commit_hook = ops.native_function("register_commit_hook")

    @classmethod
    def create(cls, devices: Iterable[torch.device]) -> NativeBackend:
        devices = set(devices)
        for device in devices:
            if not ops.native_available(device.type):
                reason = ops.native_unavailable_reason() or f"not built for {device.type}"
                raise ValueError(
                    f"backend='native' has no compiled kernels for parameters on {device} "
                    f"({reason}); rebuild with `pip install --no-build-isolation -e .`, or use "
                    "backend='torch' or 'auto'"
                )
        return cls()

    def segment_offsets(self, buffers: FactorBuffers) -> torch.Tensor:
        for i, (known, n_layers, offsets) in enumerate(self._segment_offsets):
            if known is buffers:
                if n_layers == len(buffers.slots):
                    return offsets
                del self._segment_offsets[i]
                break
        bounds = [0]
        for slot in buffers.slots:
            bounds += [slot.s_offset, slot.s_offset + slot.s_len]
        offsets = torch.tensor(bounds, dtype=torch.int64, device=buffers.device)
        self._segment_offsets.append((buffers, len(buffers.slots), offsets))
        return offsets

    always_update_factors = True  # the optimizer launches the update on every step

    def step_plan(self) -> StepPlan:
        """The cached, capturable step path (``step_plan.py``) through ``fused_step``."""
        return StepPlan()

    # ------------------------------------------------------------------------ statistics
    # CPU tensors take the C++ statistics ops; others (CUDA) the torch backend's statistics.
    def input_statistic(self, kind: LayerKind, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cpu:
            return super().input_statistic(kind, module, x)
        return native_statistics.input_statistic(kind, module, x)

    def batchnorm_input_statistic(
        self, module: nn.Module, output: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor | None:
        if not x.is_cpu:
            return super().batchnorm_input_statistic(module, output, x)
        return native_statistics.batchnorm_input_statistic(output, x)

    def hook_commit(self, buffers: FactorBuffers, slot: LayerSlot, module: nn.Module,
                    x: torch.Tensor, output: torch.Tensor, batch: int,
                    param: torch.Tensor | None, from_norm_node: bool) -> bool:
        if self._register_commit_hook is None or buffers.device.type != "cpu" or not (
                x.is_cpu and output.is_cpu):
            return False
        source = None
        if slot.kind is LayerKind.BATCHNORM:  # Ĥ from the saved batch mean, formed at commit
            source = native_statistics.batchnorm_input_source(output, x)
        h_hat = None if source is not None else self.input_statistic(slot.kind, module, x)
        if not native_statistics.register_commit_hook(
                self._register_commit_hook, buffers, slot, module, output, batch, param,
                from_norm_node, h_hat, source):
            return False
        buffers.has_pending = True  # a pass may commit (the unfed check reads the counts)
        return True

    def commit_pass(
        self,
        buffers: FactorBuffers,
        slot: LayerSlot,
        module: nn.Module,
        h_hat: torch.Tensor,
        grad_output: torch.Tensor,
        batch: int,
    ) -> None:
        if buffers.device.type != "cpu" or not grad_output.is_cpu:
            super().commit_pass(buffers, slot, module, h_hat, grad_output, batch)
            return
        native_statistics.commit_pass(buffers, slot, module, h_hat, grad_output, batch)

    def update_factors(self, buffers: FactorBuffers, gammas: Sequence[float]) -> None:
        torch.ops.adafisher.update_factors(
            buffers.factors, buffers.pending, buffers.pending_count, buffers.blended,
            buffers.nonfinite, self.segment_offsets(buffers), 1.0 - float(gammas[0]),
            float(gammas[1]), NORMALIZATION_EPS,
        )
        buffers.has_pending = False

    def step(self, group: GroupStep) -> None:
        """The per-group path (FSDP2 shards): one ``fused_step`` per (device, factor buffer)."""
        for (device, _), launch in group_launches(group).items():
            launch.run(torch.ops.adafisher.fused_step, device, group)
