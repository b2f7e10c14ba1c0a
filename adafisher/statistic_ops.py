"""The ``adafisher`` statistics ops (docs/algorithm.md §2): one schema each, declared here and
nowhere else, with a fake (meta) implementation and a pure-PyTorch reference
(``CompositeExplicitAutograd``); ``csrc/cpu_statistics.cpp`` registers the CPU kernels.

Every op sums in fp32 for fp16/bf16/fp32 inputs and in float64 for float64 ones; the results
have that dtype. "Channels" are the dims ``[channel_start, channel_end)`` of the input,
flattened; every other dim is summed over.

``channel_sum_of_squares(x, channel_start, channel_end, scale, append_one)``
    ``scale · Σ x²`` per channel, then a trailing ``1`` when ``append_one`` (Linear Ĥ and Ŝ).
``norm_input_statistic(x, channel_start, channel_end, scale, second)``
    ``[scale · Σ_c (Σ x)², second]`` (BatchNorm / LayerNorm Ĥ; from x, or from BatchNorm's saved
    batch mean with the count folded into ``scale``).
``conv_input_statistic(x, kernel_size, stride, dilation, pad_before, pad_after, groups, bias)``
    Conv Ĥ of a batched input ``(N, C_in, *spatial)`` with zero padding: for every patch element
    of the weight's input layout ``(C_in/groups, *kernel_size)`` the mean over batch, output
    positions and groups of the squared input it reads; a trailing ``1`` when ``bias``. Reads x
    once and never materializes im2col (extra memory: one sample's size).
``commit_statistics(pending, pending_count, h_hat, grad, layer, h_offset, s_offset,
channel_start, channel_end, sum_then_square, scale)``
    Commits one pass of one layer into the flat buffers (``factors.py``): adds ``h_hat`` at
    ``pending[h_offset:]``, Ŝ of ``grad`` at ``pending[s_offset:]`` and 1 to
    ``pending_count[layer]``. Ŝ is ``scale · Σ g²`` per channel (Linear, conv) or, with
    ``sum_then_square``, ``scale · (Σ g)²`` (BatchNorm, LayerNorm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .conv_statistics import accumulation_dtype, conv_input_statistic

_LIB = torch.library.Library("adafisher", "FRAGMENT")  # noqa: TOR901

_LIB.define(
    "channel_sum_of_squares(Tensor x, int channel_start, int channel_end, float scale, "
    "bool append_one) -> Tensor"
)
_LIB.define(
    "norm_input_statistic(Tensor x, int channel_start, int channel_end, float scale, "
    "float second) -> Tensor"
)
_LIB.define(
    "conv_input_statistic(Tensor x, int[] kernel_size, int[] stride, int[] dilation, "
    "int[] pad_before, int[] pad_after, int groups, bool bias) -> Tensor"
)
_LIB.define(
    "commit_statistics(Tensor(a!) pending, Tensor(b!) pending_count, Tensor h_hat, Tensor grad, "
    "int layer, int h_offset, int s_offset, int channel_start, int channel_end, "
    "bool sum_then_square, float scale) -> ()"
)


# --------------------------------------------------------------------------------- fakes
@torch.library.register_fake("adafisher::channel_sum_of_squares")
def _channel_sum_of_squares_fake(x, channel_start, channel_end, scale, append_one):
    channels = math.prod(x.shape[channel_start:channel_end])
    return x.new_empty(channels + int(append_one), dtype=accumulation_dtype(x))


@torch.library.register_fake("adafisher::norm_input_statistic")
def _norm_input_statistic_fake(x, channel_start, channel_end, scale, second):
    return x.new_empty(2, dtype=accumulation_dtype(x))


@torch.library.register_fake("adafisher::conv_input_statistic")
def _conv_input_statistic_fake(x, kernel_size, stride, dilation, pad_before, pad_after, groups,
                               bias):
    patch = x.shape[1] // groups * math.prod(kernel_size)
    return x.new_empty(patch + int(bias), dtype=accumulation_dtype(x))


@torch.library.register_fake("adafisher::commit_statistics")
def _commit_statistics_fake(pending, pending_count, h_hat, grad, layer, h_offset, s_offset,
                            channel_start, channel_end, sum_then_square, scale) -> None:
    return None


# ------------------------------------------------------------------ reference implementations
def _channel_sums(x: torch.Tensor, channel_start: int, channel_end: int,
                  square: bool) -> torch.Tensor:
    if not 0 <= channel_start <= channel_end <= x.dim():
        raise RuntimeError(f"channel dims [{channel_start}, {channel_end}) must lie within the "
                           f"input's {x.dim()} dims")
    values = x.to(accumulation_dtype(x))
    if square:
        values = values.square()
    others = [d for d in range(x.dim()) if not channel_start <= d < channel_end]
    if others:  # sum([]) would sum everything
        values = values.sum(others)
    return values.reshape(-1)


def channel_sum_of_squares_reference(x: torch.Tensor, channel_start: int, channel_end: int,
                                     scale: float, append_one: bool) -> torch.Tensor:
    sums = _channel_sums(x, channel_start, channel_end, square=True).mul_(scale)
    return torch.cat([sums, sums.new_ones(1)]) if append_one else sums


def norm_input_statistic_reference(x: torch.Tensor, channel_start: int, channel_end: int,
                                   scale: float, second: float) -> torch.Tensor:
    sums = _channel_sums(x, channel_start, channel_end, square=False)
    first = torch.dot(sums, sums).mul_(scale).reshape(1)
    return torch.cat([first, first.new_full((1,), second)])


@dataclass(frozen=True)
class _ConvGeometry:
    """The attributes of an ``nn.Conv*d`` that ``conv_statistics.conv_input_statistic`` reads."""

    in_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    _reversed_padding_repeated_twice: tuple[int, ...]
    groups: int
    bias: torch.Tensor | None
    padding_mode: str = "zeros"


def conv_input_statistic_reference(x: torch.Tensor, kernel_size: list[int], stride: list[int],
                                   dilation: list[int], pad_before: list[int],
                                   pad_after: list[int], groups: int,
                                   bias: bool) -> torch.Tensor:
    if x.dim() != len(kernel_size) + 2:
        raise RuntimeError(f"input must be batched (N, C, *spatial) with {len(kernel_size)} "
                           f"spatial dims, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise RuntimeError("the batch is empty (a pass with no samples has no statistic)")
    reversed_pads = []
    for before, after in zip(reversed(pad_before), reversed(pad_after), strict=True):
        reversed_pads += [before, after]
    geometry = _ConvGeometry(
        x.shape[1], tuple(kernel_size), tuple(stride), tuple(dilation), tuple(reversed_pads),
        groups, torch.ones(()) if bias else None,
    )
    return conv_input_statistic(geometry, x)


def commit_statistics_reference(pending: torch.Tensor, pending_count: torch.Tensor,
                                h_hat: torch.Tensor, grad: torch.Tensor, layer: int,
                                h_offset: int, s_offset: int, channel_start: int,
                                channel_end: int, sum_then_square: bool, scale: float) -> None:
    sums = _channel_sums(grad, channel_start, channel_end, square=not sum_then_square)
    s_hat = sums.square_().mul_(scale) if sum_then_square else sums.mul_(scale)
    pending[h_offset : h_offset + h_hat.numel()].add_(h_hat)
    pending[s_offset : s_offset + s_hat.numel()].add_(s_hat)
    pending_count[layer : layer + 1].add_(1.0)


_LIB.impl("channel_sum_of_squares", channel_sum_of_squares_reference, "CompositeExplicitAutograd")
_LIB.impl("norm_input_statistic", norm_input_statistic_reference, "CompositeExplicitAutograd")
_LIB.impl("conv_input_statistic", conv_input_statistic_reference, "CompositeExplicitAutograd")
_LIB.impl("commit_statistics", commit_statistics_reference, "CompositeExplicitAutograd")
