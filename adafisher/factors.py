"""The flat per-device buffers that hold every tracked layer's factors (docs/algorithm.md
§1, §3, §8).

One layout per device and factor dtype (fp32; float64 for float64 layers): each layer owns an
H segment and an S segment of one flat buffer,
so normalize + blend for the whole model is a handful of vector ops (one launch in Triton).
Segment ``2·i`` is layer i's H, segment ``2·i + 1`` its S.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layers import LayerKind


@dataclass(frozen=True)
class LayerSlot:
    """A tracked layer's place in its device's flat buffers."""

    name: str
    kind: LayerKind
    index: int  # position among this device's layers
    h_offset: int
    h_len: int
    s_offset: int
    s_len: int


@dataclass
class FactorBuffers:
    """Factors, pending (not yet blended) statistics and bookkeeping for one device."""

    device: torch.device
    dtype: torch.dtype = torch.float32  # of factors, pending and pending_count
    slots: list[LayerSlot] = field(default_factory=list)
    factors: torch.Tensor | None = None  # [total]: H and S segments
    pending: torch.Tensor | None = None  # [total]: sums of fresh statistics
    pending_count: torch.Tensor | None = None  # [n_layers]: passes summed in `pending`
    blended: torch.Tensor | None = None  # bool [2·n_layers]: segment blended at least once
    nonfinite: torch.Tensor | None = None  # int64 [2·n_layers]: discarded non-finite stats
    segment_ids: torch.Tensor | None = None  # int64 [total]: segment of each element
    # Host-side "some statistics may be pending", so steps without any launch nothing. Set when
    # a pass commits, or when one is hooked to commit natively (it may never: no backward).
    has_pending: bool = False

    @property
    def total(self) -> int:
        return self.slots[-1].s_offset + self.slots[-1].s_len if self.slots else 0

    def add_layer(self, name: str, kind: LayerKind, h_len: int, s_len: int) -> LayerSlot:
        """Append a layer, growing the buffers and keeping what they already hold."""
        start = self.total
        slot = LayerSlot(name, kind, len(self.slots), start, h_len, start + h_len, s_len)
        self.slots.append(slot)
        self._grow(h_len + s_len)
        return slot

    def _grow(self, extra: int) -> None:
        dev, f32 = self.device, self.dtype

        def grown(old: torch.Tensor | None, new_part: torch.Tensor) -> torch.Tensor:
            return new_part if old is None else torch.cat([old, new_part])

        self.factors = grown(self.factors, torch.ones(extra, device=dev, dtype=f32))
        self.pending = grown(self.pending, torch.zeros(extra, device=dev, dtype=f32))
        self.pending_count = grown(self.pending_count, torch.zeros(1, device=dev, dtype=f32))
        self.blended = grown(self.blended, torch.zeros(2, device=dev, dtype=torch.bool))
        self.nonfinite = grown(self.nonfinite, torch.zeros(2, device=dev, dtype=torch.int64))
        lengths = torch.tensor([n for s in self.slots for n in (s.h_len, s.s_len)],
                               dtype=torch.int64)
        self.segment_ids = torch.repeat_interleave(
            torch.arange(len(lengths), dtype=torch.int64), lengths
        ).to(dev)

    def initialized(self) -> torch.Tensor:
        """bool [n_layers]: both factors blended at least once (before that, F = 1)."""
        return self.blended.view(-1, 2).all(1)

    def layer_state(self, slot: LayerSlot) -> dict[str, torch.Tensor]:
        """One layer's state as independent CPU-loadable tensors (clones, not views of the
        flat buffer, so saving does not drag the whole buffer along)."""
        i = slot.index
        h = slice(slot.h_offset, slot.h_offset + slot.h_len)
        s = slice(slot.s_offset, slot.s_offset + slot.s_len)
        return {
            "H": self.factors[h].clone(),
            "S": self.factors[s].clone(),
            "pending_H": self.pending[h].clone(),
            "pending_S": self.pending[s].clone(),
            "pending_count": self.pending_count[i].clone(),
            "blended": self.blended[2 * i : 2 * i + 2].clone(),
            "nonfinite": self.nonfinite[2 * i : 2 * i + 2].clone(),
        }

    def load_layer_state(self, slot: LayerSlot, state: dict[str, torch.Tensor]) -> None:
        i = slot.index
        h = slice(slot.h_offset, slot.h_offset + slot.h_len)
        s = slice(slot.s_offset, slot.s_offset + slot.s_len)
        for key, target in (
            ("H", self.factors[h]),
            ("S", self.factors[s]),
            ("pending_H", self.pending[h]),
            ("pending_S", self.pending[s]),
            ("pending_count", self.pending_count[i]),
            ("blended", self.blended[2 * i : 2 * i + 2]),
            ("nonfinite", self.nonfinite[2 * i : 2 * i + 2]),
        ):
            value = state[key]
            if value.shape != target.shape:
                raise ValueError(
                    f"state for layer {slot.name!r}: {key} has shape {tuple(value.shape)}, "
                    f"this optimizer expects {tuple(target.shape)}"
                )
            target.copy_(value)
        self.has_pending = self.has_pending or bool(state["pending_count"] > 0)
