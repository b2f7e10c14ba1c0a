"""FSDP2 (``fully_shard``) support: the step on local shards, and checkpoint plumbing
(docs/algorithm.md §7).

Under FSDP2 the optimizer holds the sharded ``DTensor`` parameters (what the modules hold
between forward passes), and the layers' hooks see the unsharded computation, so statistics
and their all-reduce are those of plain data parallelism. The step runs on each rank's local
shard: a shard holding rows ``r0:r1`` of a parameter (dim 0, FSDP2's default) reads
``S[r0:r1]`` and all of H. That is a ``FactorIndex`` whose S offset moves by ``r0``, so every
backend's ordinary fused path updates the local tensors unchanged. Momentum is a ``DTensor``
sharded like its parameter, which is what ``torch.distributed.checkpoint`` reshards.

``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` keeps only an optimizer's
``"state"`` and ``"param_groups"``; the optimizer-wide AdaFisher entry therefore also travels
in the first param group, and loading accepts it from there.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any

import torch
from torch import nn

from .layers import FactorIndex

STATE_KEY = "adafisher"


def _dtensor_module():
    """``torch.distributed.tensor`` if something imported it (no DTensor can exist before),
    so importing adafisher does not pay for it."""
    return sys.modules.get("torch.distributed.tensor")


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP2 parameter, gradient or momentum)."""
    module = _dtensor_module()
    return module is not None and isinstance(tensor, module.DTensor)


def check_parameters(model: nn.Module, params: list[torch.Tensor]) -> None:
    """Refuse DTensor parameters whose layout the local step cannot handle: anything but
    FSDP2's sharding on dim 0 (plus replication, as in HSDP), e.g. tensor parallelism."""
    sharded_params = [p for p in params if is_sharded(p)]
    if not sharded_params:
        return
    from torch.distributed.tensor import Replicate, Shard  # noqa: PLC0415

    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    for p in sharded_params:
        name = names.get(id(p), f"<parameter of shape {tuple(p.shape)}>")
        sharded = [pl for pl in p.placements if not isinstance(pl, Replicate)]
        supported = all(type(pl) is Shard and pl.dim == 0 for pl in sharded)
        if not supported or len(sharded) > 1:
            raise ValueError(
                f"parameter {name!r} is a DTensor with placements {tuple(p.placements)}: "
                "AdaFisher supports FSDP2 sharding on dim 0 (Shard(0), optionally with "
                "Replicate() as in HSDP) only, not other shard dims or tensor parallelism"
            )


def local_row_offset(p: torch.Tensor) -> int:
    """First global row (dim 0) of this rank's shard of ``p``."""
    return _row_offset(tuple(p.shape), p.device_mesh, tuple(p.placements))


@functools.lru_cache(maxsize=1024)
def _row_offset(shape: tuple[int, ...], mesh, placements: tuple) -> int:
    # cached: computing it costs more than a small parameter's whole update
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # noqa: PLC0415

    _, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    return int(offset[0]) if offset else 0


def local_index(index: FactorIndex, p: torch.Tensor, local: torch.Tensor) -> FactorIndex:
    """``index`` for the local shard of ``p``: the parameter viewed as ``(rows, cols)`` is
    row-major, so rows ``r0:r1`` of dim 0 are a contiguous block of those rows."""
    inner = math.prod(p.shape[1:])
    first_row = local_row_offset(p) * inner // index.cols
    return FactorIndex(
        index.layer, local.numel() // index.cols, index.cols, index.h_offset,
        index.s_offset + first_row,
    )


def local_shards(
    p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, index: FactorIndex | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, FactorIndex | None]:
    """The local tensors the step updates in place, and the factor index of their rows."""
    for what, t in (("gradient", grad), ("momentum (exp_avg)", exp_avg)):
        if not is_sharded(t) or t.placements != p.placements:
            layout = t.placements if is_sharded(t) else "a plain tensor"
            raise ValueError(
                f"the {what} of a DTensor parameter of shape {tuple(p.shape)} is {layout}, "
                f"not sharded like the parameter ({p.placements}); load sharded optimizer "
                "state with torch.distributed.checkpoint / set_optimizer_state_dict"
            )
    local = p.to_local()
    if index is not None:
        index = local_index(index, p, local)
    return local, grad.to_local(), exp_avg.to_local(), index


def share_with_param_groups(state: dict[str, Any]) -> dict[str, Any]:
    """Let the AdaFisher entry of an optimizer state dict also ride in the first param group
    (the same object: ``torch.save`` stores it once), which is all that
    ``get_optimizer_state_dict`` keeps besides per-parameter state."""
    if state.get("param_groups") and STATE_KEY in state:
        state["param_groups"][0][STATE_KEY] = state[STATE_KEY]
    return state


def lift_from_param_groups(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``state`` with the AdaFisher entry at the top level and none in the param
    groups (they would otherwise become keys of the optimizer's own groups)."""
    groups = state.get("param_groups")
    if not isinstance(groups, list) or not any(
        isinstance(g, dict) and STATE_KEY in g for g in groups
    ):
        return state
    state = dict(state)
    stripped = []
    for group in groups:
        group = dict(group)
        carried = group.pop(STATE_KEY, None)
        if carried is not None:
            state.setdefault(STATE_KEY, carried)
        stripped.append(group)
    state["param_groups"] = stripped
    return state
