"""The few verbs every backend implements on the flat buffers (see ``factors.py``).

Data flows one way: layer hooks call ``input_statistic`` (forward) and ``commit_pass``
(backward, adding the pass's Ĥ and Ŝ into the pending buffer), or hand both to
``hook_commit`` where a backend commits from native autograd hooks; ``step()`` calls
``update_factors`` (normalize + blend, once) and then ``step`` per parameter group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from ..factors import FactorBuffers, LayerSlot
from ..layers import FactorIndex, LayerKind


@dataclass
class GroupStep:
    """Everything one parameter group's update needs. ``indices[i]`` is None for parameters
    with F = 1 (no tracked layer); ``buffers[i]`` holds that parameter's layer's factors."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    steps: list[int]
    indices: list[FactorIndex | None]
    buffers: list[FactorBuffers | None]
    lr: float
    beta: float
    weight_decay: float
    damping: float
    decoupled: bool
    maximize: bool = False  # step along +gradient


class Backend(Protocol):
    name: str

    def input_statistic(self, kind: LayerKind, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Ĥ of one forward pass (fp32 vector of the layer's H length)."""

    def batchnorm_input_statistic(
        self, module: nn.Module, output: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor | None:
        """BatchNorm's Ĥ from the batch mean its autograd node saved, or None if there is none."""

    def hook_commit(self, buffers: FactorBuffers, slot: LayerSlot, module: nn.Module,
                    x: torch.Tensor, output: torch.Tensor, batch: int,
                    param: torch.Tensor | None, from_norm_node: bool) -> bool:
        """The forward hook's fast path: take Ĥ of this pass from ``x`` and have autograd commit
        the pass natively when the gradient of ``output`` arrives (``from_norm_node``: Ŝ from
        the bias gradient of the norm node that produced ``output``), provided the backward
        accumulates into ``param`` (None: unknown, commit). False: not done, the Python hooks
        take the pass (``input_statistic`` now, ``commit_pass`` in the backward)."""

    def commit_pass(
        self,
        buffers: FactorBuffers,
        slot: LayerSlot,
        module: nn.Module,
        h_hat: torch.Tensor,
        grad_output: torch.Tensor,
        batch: int,
    ) -> None:
        """Add one completed pass's Ĥ and Ŝ (from ``grad_output``) to the pending sums."""

    def update_factors(self, buffers: FactorBuffers, gammas: Sequence[float]) -> None:
        """docs/algorithm.md §3 for every layer with pending statistics; clears the pending sums."""

    def step(self, group: GroupStep) -> None:
        """docs/algorithm.md §6 for every parameter of the group, in place."""
