"""The Triton backend: fused statistics, factor update and step (kernels in ``adafisher.kernels``).

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
from ..functional import adafisher_update, preconditioner
from ..layers import FactorIndex, LayerKind
from . import torch_backend
from .base import GroupStep


def _kernels() -> tuple[ModuleType, ModuleType, ModuleType]:
    """The kernel modules and their front-end adapter (imported lazily: Triton is optional)."""
    from ..kernels import blend, fused_step  # noqa: PLC0415
    from . import triton_statistics  # noqa: PLC0415

    return blend, fused_step, triton_statistics


def _import_error() -> str | None:
    """Why the kernels cannot be imported (None when they can). Any exception counts: a broken
    Triton install must leave backend="auto" on the torch backend, not crash it."""
    try:
        _kernels()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def _interpreted() -> bool:
    from ..kernels._launch import interpreted  # noqa: PLC0415

    return interpreted(_kernels()[1]._step_kernel)


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
        blend, fused_step, statistics_adapter = _kernels()
        self._blend, self._fused, self._stats = blend, fused_step, statistics_adapter
        self._segments = SegmentTables()
        # id(param) → (weak reference, reason): parameters the fused step could not take
        self.slow_path: dict[int, tuple[weakref.ref, str]] = {}
        self._warned_slow_path = False
        self._scratch = statistics_adapter.ScratchPool()
        self._step_tables = fused_step.StepTables()

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
        if buffers.dtype != torch.float32 or not _runs_on(buffers.device, self.interpreted):
            torch_backend.update_factors(buffers, gammas)
            return
        table, longest = self._segments.get(buffers)
        self._blend.update_factors(
            buffers.factors, buffers.pending, buffers.pending_count, buffers.blended,
            buffers.nonfinite, table, longest, (float(gammas[0]), float(gammas[1])),
            torch_backend.NORMALIZATION_EPS,
        )
        buffers.has_pending = False

    # ------------------------------------------------------------------------------ step
    def step(self, group: GroupStep) -> None:
        step_item = self._fused.StepItem
        # One launch per (device, param dtype, grad dtype, alignment): one misaligned parameter
        # gets its own launch instead of turning off vector loads for all. Its tracked
        # parameters must share one FactorBuffers (the optimizer keeps one per device),
        # untracked ones join any.
        launches: dict[tuple, list] = {}
        owners: dict[tuple, FactorBuffers] = {}
        for i, param in enumerate(group.params):
            if param.numel() == 0:  # zero-size layers (``Linear(0, n)``): nothing to update
                continue
            grad, exp_avg = group.grads[i], group.exp_avgs[i]
            index, buffers = group.indices[i], group.buffers[i]
            inner, reason = self._fusable(param, grad, exp_avg, index, buffers)
            aligned = all(t.data_ptr() % 16 == 0 for t in (param, grad, exp_avg))
            key = (param.device, param.dtype, grad.dtype, aligned)
            if inner is not None and index is not None and owners.setdefault(
                    key, buffers) is not buffers:
                inner, reason = None, "its layer's factors live in another buffer"
            if inner is not None:
                place = None if index is None else self._fused.FactorPlace(
                    index.layer, index.cols, index.h_offset, index.s_offset)
                item = step_item(param, grad, exp_avg, group.steps[i], place, inner)
                launches.setdefault(key, []).append(item)
            else:
                self._note_slow_path(param, reason)
                _reference_update(param, grad, exp_avg, group.steps[i], index, buffers, group)
        for key, items in launches.items():
            buffers = owners.get(key)
            self._fused.fused_step(
                items,
                buffers.factors if buffers is not None else None,
                buffers.blended if buffers is not None else None,
                lr=group.lr, beta=group.beta, weight_decay=group.weight_decay,
                damping=group.damping, decoupled=group.decoupled, tables=self._step_tables,
                maximize=group.maximize,
            )

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

    def _fusable(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        exp_avg: torch.Tensor,
        index: FactorIndex | None,
        buffers: FactorBuffers | None,
    ) -> tuple[int | None, str]:
        """``(inner, "")`` (see ``StepItem``) when the fused kernel can update this parameter,
        else ``(None, why not)``."""
        dtypes = self._fused.FUSED_DTYPES
        if param.dtype not in dtypes or grad.dtype not in dtypes or exp_avg.dtype != param.dtype:
            return None, f"dtype {param.dtype} / gradient {grad.dtype}"
        if not _runs_on(param.device, self.interpreted):
            return None, f"device {param.device}"
        if grad.device != param.device or exp_avg.device != param.device:
            return None, "gradient or momentum on another device"
        if grad.shape != param.shape or exp_avg.shape != param.shape:
            return None, "gradient shape differs"
        if grad.stride() != param.stride() or exp_avg.stride() != param.stride():
            return None, "gradient or momentum strides differ from the parameter's"
        if index is None:
            return (1, "") if _dense(param) else (None, "not dense in memory")
        if buffers is None or buffers.device != param.device:
            return None, "its layer's factors live on another device"
        if buffers.dtype != torch.float32:
            return None, f"float64 factors ({buffers.dtype})"
        if param.is_contiguous():
            return index.cols, ""
        layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(param.dim())
        if layout is not None and param.is_contiguous(memory_format=layout):
            return param.shape[1], ""
        return None, "layout neither row-major nor channels_last"


class SegmentTables:
    """Per-buffer device tables of ``(offset, length)`` per segment for the blend kernel, and
    the longest segment; rebuilt when layers are added (``add_param_group``)."""

    def __init__(self) -> None:
        self._tables: dict[int, tuple[object, int, torch.Tensor, int]] = {}

    def get(self, buffers: FactorBuffers) -> tuple[torch.Tensor, int]:
        entry = self._tables.get(id(buffers))
        if entry is not None and entry[0]() is buffers and entry[1] == len(buffers.slots):
            return entry[2], entry[3]
        from ..kernels._tables import device_table  # noqa: PLC0415

        values = [v for s in buffers.slots for v in (s.h_offset, s.h_len, s.s_offset, s.s_len)]
        table = device_table(values, buffers.device)
        longest = max((max(s.h_len, s.s_len) for s in buffers.slots), default=1)
        self._tables[id(buffers)] = (weakref.ref(buffers), len(buffers.slots), table, longest)
        return table, longest


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense in some dim order (an elementwise update may run over memory)."""
    expected = 1
    for stride, size in sorted((s, n) for n, s in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _reference_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    step: int,
    index: FactorIndex | None,
    buffers: FactorBuffers | None,
    group: GroupStep,
) -> None:
    """The torch update for one parameter, choosing F on the device (no host read)."""
    fisher = None
    if index is not None:
        f = buffers.factors
        fisher = preconditioner(
            f[index.s_offset : index.s_offset + index.rows],
            f[index.h_offset : index.h_offset + index.cols],
            group.damping,
            param.shape,
        )
        ready = buffers.initialized()[index.layer]
        fisher = torch.where(ready, fisher, torch.ones((), dtype=fisher.dtype, device=f.device))
        fisher = fisher.to(param.device)
    adafisher_update(
        param, grad, exp_avg, step, fisher, lr=group.lr, beta=group.beta,
        weight_decay=group.weight_decay, decoupled=group.decoupled, maximize=group.maximize,
    )
