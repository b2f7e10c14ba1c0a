"""The Triton backend: fused statistics, factor update and step (kernels in ``adafisher.kernels``).

The factor update and the step go through the ``adafisher::triton_update_factors`` and
``adafisher::triton_fused_step`` ops (``adafisher/triton_ops.py``, the schemas of
``adafisher/ops.py``), which ``torch.compile`` traces into.

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before Triton was
imported (that is how CI tests it). Anything the kernels do not cover falls back to the torch
reference per item, without host-device synchronization: float64 parameters, activations and
factor buffers (the kernels are fp32), parameters whose
gradient or momentum is laid out differently from them, weights in layouts other than
row-major or channels_last.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Iterable, Sequence
from types import ModuleType

import torch
from torch import nn

from .. import autograd_statistics, statistics
from ..factors import FactorBuffers, LayerSlot
from ..layers import LayerKind
from ..step_plan import GroupPlan, StepPlan
from . import torch_backend
from .base import GroupStep
from .step_launches import group_launches


def _kernels() -> tuple[ModuleType, ModuleType]:
    """The Triton ops and the statistics adapter (imported lazily: Triton is optional)."""
    from .. import triton_ops  # noqa: PLC0415
    from . import triton_statistics  # noqa: PLC0415

    return triton_ops, triton_statistics


def _import_error() -> str | None:
    """Why the kernels cannot be imported (None when they can). Any exception counts: a broken
    Triton install must leave backend="auto" on the torch backend, not crash it."""
    try:
        _kernels()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def _interpreted() -> bool:
    return _kernels()[0].INTERPRETED


def usable_on(devices: Iterable[torch.device]) -> bool:
    """Whether ``backend="auto"`` should pick Triton: all devices CUDA, Triton importable and
    not in interpreter mode."""
    devices = set(devices)
    if not devices or any(d.type != "cuda" for d in devices):
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _import_error() is None and not _interpreted()


def _runs_on(device: torch.device, interpreted: bool) -> bool:
    return device.type == ("cpu" if interpreted else "cuda")


class TritonBackend:
    name = "triton"

    def __init__(self, interpreted: bool) -> None:
        self.interpreted = interpreted
        self._ops, statistics_adapter = _kernels()
        self._stats = statistics_adapter
        self._segments = SegmentOffsets()
        # id(param) → (weak reference, reason): parameters the fused step could not take
        self.slow_path: dict[int, tuple[weakref.ref, str]] = {}
        self._warned_slow_path = False
        self._scratch = statistics_adapter.ScratchPool()

    @classmethod
    def create(cls, devices: Iterable[torch.device]) -> TritonBackend:
        error = _import_error()
        if error is not None:
            raise ValueError(
                f"backend='triton' needs Triton (pip install 'adafisher[triton]'): {error}; "
                "use backend='torch' or 'auto'"
            )
        interpreted = _interpreted()
        for device in set(devices):
            if _runs_on(device, interpreted):
                continue
            if interpreted:
                raise ValueError(
                    f"backend='triton' under TRITON_INTERPRET=1 runs on CPU tensors only, got "
                    f"parameters on {device}; unset TRITON_INTERPRET to run on CUDA"
                )
            raise ValueError(
                f"backend='triton' runs on CUDA devices, got parameters on {device} (CPU "
                "tensors only with TRITON_INTERPRET=1 set before Triton is imported); use "
                "backend='torch' or 'auto'"
            )
        return cls(interpreted)

    # ------------------------------------------------------------------------ statistics
    def input_statistic(self, kind: LayerKind, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float64 or not _runs_on(x.device, self.interpreted):
            return statistics.input_statistic(kind, module, x)
        return self._stats.input_statistic(kind, module, x, self._scratch)

    def batchnorm_input_statistic(
        self, module: nn.Module, output: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor | None:
        if x.dtype == torch.float64 or not _runs_on(x.device, self.interpreted):
            return autograd_statistics.batchnorm_input_statistic(output, x)
        return self._stats.batchnorm_input_statistic(module, output, x, self._scratch)

    def hook_commit(self, buffers: FactorBuffers, slot: LayerSlot, module: nn.Module,
                    x: torch.Tensor, output: torch.Tensor, batch: int,
                    param: torch.Tensor | None, from_norm_node: bool) -> bool:
        return False  # the Python hooks commit (commit_pass)

    def commit_pass(
        self,
        buffers: FactorBuffers,
        slot: LayerSlot,
        module: nn.Module,
        h_hat: torch.Tensor,
        grad_output: torch.Tensor,
        batch: int,
    ) -> None:
        if (
            grad_output.device != buffers.device
            or buffers.dtype != torch.float32
            or not _runs_on(buffers.device, self.interpreted)
        ):
            torch_backend.TorchBackend().commit_pass(
                buffers, slot, module, self._stats.settle(h_hat, module, self._scratch),
                grad_output, batch
            )
            return
        self._stats.commit_pass(buffers, slot, module, h_hat, grad_output, batch, self._scratch)

    def update_factors(self, buffers: FactorBuffers, gammas: Sequence[float]) -> None:
        # float64 buffers, or buffers the kernels do not run on: the op's torch reference
        torch.ops.adafisher.triton_update_factors(
            buffers.factors, buffers.pending, buffers.pending_count, buffers.blended,
            buffers.nonfinite, self._segments.get(buffers), 1.0 - float(gammas[0]),
            float(gammas[1]), torch_backend.NORMALIZATION_EPS,
        )
        buffers.has_pending = False

    # ------------------------------------------------------------------------------ step
    @property
    def always_update_factors(self) -> bool:
        """Whether the optimizer launches the factor update on every step (no host flag on
        the hot path). Not under the interpreter, where a launch costs milliseconds of CPU."""
        return not self.interpreted

    def step_plan(self) -> StepPlan:
        """The cached, capturable step path (``step_plan.py``) through ``triton_fused_step``."""
        return StepPlan("triton_fused_step", self._note_planned_slow_paths)

    def _note_planned_slow_paths(self, plan: GroupPlan, grads: list) -> None:
        """When a plan is (re)built: note the parameters the op will step on the torch path
        (checked with the gradients of that step; a later gradient of another layout is still
        stepped correctly, by the op's own per-parameter fallback)."""
        for launch in plan.launches:
            for position, param in enumerate(launch.params):
                tracked = launch.layers[position] >= 0
                reason = self._ops.fused_refusal(
                    param, grads[launch.positions[position]], launch.exp_avgs[position],
                    tracked, launch.factors if tracked else param)
                if reason is not None:
                    self._note_slow_path(param, reason)

    def step(self, group: GroupStep) -> None:
        """One ``triton_fused_step`` per (device, factor buffer). This path gets host step
        counts (the optimizer counted them): they and lr travel to the device with non-blocking
        copies."""
        launches = group_launches(group)
        for (device, _), launch in launches.items():
            for position, param in enumerate(launch.params):
                factors = launch.buffers.factors if launch.layers[position] >= 0 else param
                reason = self._ops.fused_refusal(param, launch.grads[position],
                                                 launch.exp_avgs[position],
                                                 launch.layers[position] >= 0, factors)
                if reason is not None:
                    self._note_slow_path(param, reason)
            launch.run(torch.ops.adafisher.triton_fused_step, device, group)

    def _note_slow_path(self, param: torch.Tensor, reason: str) -> None:
        """Record a parameter updated by the per-parameter torch path; warn the first time."""
        if id(param) in self.slow_path:
            return
        self.slow_path[id(param)] = (weakref.ref(param), reason)
        if not self._warned_slow_path:
            self._warned_slow_path = True
            warnings.warn(
                f"AdaFisher (backend='triton'): a parameter of shape {tuple(param.shape)} is "
                f"updated by the per-parameter torch path ({reason}), several launches and a "
                "full-size F instead of the fused step; see optimizer.slow_path_parameters "
                "for all of them. Warned once.",
                RuntimeWarning,
                stacklevel=4,
            )

    def slow_path_parameters(self) -> list[tuple[torch.Tensor, str]]:
        """``(parameter, reason)`` for every live parameter that took the torch path."""
        live = []
        for ref, reason in self.slow_path.values():
            param = ref()
            if param is not None:
                live.append((param, reason))
        return live

class SegmentOffsets:
    """Per buffer, the ``segment_offsets`` of ``update_factors`` on its device (segment
    ``2l`` is layer ``l``'s H, ``2l + 1`` its S); rebuilt when layers are added."""

    def __init__(self) -> None:
        self._offsets: dict[int, tuple[object, int, torch.Tensor]] = {}

    def get(self, buffers: FactorBuffers) -> torch.Tensor:
        entry = self._offsets.get(id(buffers))
        if entry is not None and entry[0]() is buffers and entry[1] == len(buffers.slots):
            return entry[2]
        from ..kernels._tables import device_table  # noqa: PLC0415

        bounds = [0]
        for slot in buffers.slots:
            bounds += [slot.s_offset, slot.s_offset + slot.s_len]
        offsets = device_table(bounds, buffers.device)
        self._offsets[id(buffers)] = (weakref.ref(buffers), len(buffers.slots), offsets)
        return offsets
