"""The safety net for tracked layers that get no statistics (docs/algorithm.md §2: a layer
listed as tracked must receive them), without synchronizing the host with the device.

On a statistics step where some layer got statistics, a tracked layer whose parameters have
gradients but whose pass count is 0 was trained without its forward hook seeing the pass (e.g. a
weight applied functionally): it is named once, in a ``RuntimeWarning``. The pass counts live on
the parameters' device. On CPU they are read at once (no synchronization involved); on CUDA the
step copies "count is 0" into pinned host memory asynchronously and records an event, and a
later ``step()`` reads the copy once the event has completed (``Event.query()`` does not
block): the warning comes a step or so late, and the hot path never waits for the device.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch

from .factors import FactorBuffers

# warn → _report → check/poll → AdaFisher.step → no_grad wrapper → step wrapper → the caller
_STACKLEVEL = 6


@dataclass
class _InFlight:
    buffers: FactorBuffers
    unfed: torch.Tensor  # pinned bool [n_layers]: pass count was 0, once `done` has completed
    done: Any  # torch.cuda.Event recorded after the copy
    layers_with_grads: Collection[int]
    without_samples: frozenset[str]


class UnfedLayerCheck:
    def __init__(self) -> None:
        self.warned: set[str] = set()  # layers already named
        self._in_flight: list[_InFlight] = []

    def check(self, buffers: FactorBuffers, layers_with_grads: Collection[int],
              without_samples: set[str]) -> None:
        """Before the factor update of a statistics step (it clears the pass counts).
        ``layers_with_grads``: indices of the buffer's layers whose parameters have gradients;
        ``without_samples``: layers whose passes had no samples (fed nothing, by design)."""
        if not layers_with_grads:
            return
        counts = buffers.pending_count
        if counts.device.type == "meta":  # shapes only: no counts to read
            return
        if counts.device.type != "cuda":
            if not bool(counts.any()):
                return  # no layer got statistics (the flag can be set by a pass not committed)
            self._report(buffers, (counts == 0).nonzero().flatten().tolist(), layers_with_grads,
                         without_samples)
            return
        if any(pending.buffers is buffers for pending in self._in_flight):
            return  # the previous check of this buffer is still being copied: skip this one
        if torch.cuda.is_current_stream_capturing():
            return  # a CUDA graph being captured: its replays would not report anything
        unfed = torch.empty(counts.shape, dtype=torch.bool, pin_memory=True)
        unfed.copy_(counts == 0, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._in_flight.append(_InFlight(buffers, unfed, done, frozenset(layers_with_grads),
                                         frozenset(without_samples)))

    def poll(self) -> None:
        """Report the checks whose copies have arrived (never waits for the device)."""
        if not self._in_flight:
            return
        waiting = []
        for pending in self._in_flight:
            if pending.done.query():
                self._report(pending.buffers, pending.unfed.nonzero().flatten().tolist(),
                             pending.layers_with_grads, pending.without_samples)
            else:
                waiting.append(pending)
        self._in_flight = waiting

    def _report(self, buffers: FactorBuffers, unfed: list[int],
                layers_with_grads: Collection[int], without_samples: Collection[str]) -> None:
        for index in unfed:
            name = buffers.slots[index].name
            if index in layers_with_grads and name not in self.warned and (
                name not in without_samples
            ):
                self.warned.add(name)
                warnings.warn(
                    f"AdaFisher: tracked layer {name!r} took part in training but received "
                    "no curvature statistics on a statistics step (its forward hook did not see "
                    "the pass), so its factors were not updated (F = 1 until a first blend)",
                    RuntimeWarning,
                    stacklevel=_STACKLEVEL,
                )
