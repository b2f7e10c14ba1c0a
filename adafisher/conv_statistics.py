"""The conv input statistic Ĥ without im2col (docs/algorithm.md §2).

For a patch element (c, k₁, k₂, …) the statistic sums x² over every (sample, output position,
group) that reads it. Summing over the batch first leaves ``X2[c, l₁, l₂, …]``; the set of input
positions a kernel offset k reads along one spatial dim is ``{o·stride + k·dilation − pad}``, a
product set across dims, so the remaining sum is a small matrix product per dim with a
``(K, L)`` count matrix ``M[k, l]`` = how many output positions make offset k read position l.
Non-zero padding modes are copies of real positions, so they simply add to the counts.
Extra memory is ``C·L₁·L₂…`` plus a bounded batch chunk: it does not grow with the batch.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

# Elements of x squared at once while reducing over the batch: bounds the temporary memory
# (2 MiB in fp32, small enough to stay in cache on CPUs, where it measured fastest).
_REDUCE_CHUNK_ELEMENTS = 1 << 19


@functools.lru_cache(maxsize=512)
def _offset_counts(
    length: int,
    kernel: int,
    stride: int,
    dilation: int,
    pad_left: int,
    pad_right: int,
    mode: str,
    device: torch.device,
) -> tuple[torch.Tensor, int]:
    """``(M, n_out)``: ``M[k, l]`` counts the output positions at which kernel offset ``k``
    reads input position ``l`` along one dim (fp32 on ``device``, cached so a training loop
    copies nothing to the device); ``n_out`` is the output length."""
    padded = length + pad_left + pad_right
    n_out = (padded - dilation * (kernel - 1) - 1) // stride + 1
    if n_out <= 0:
        raise ValueError(f"conv output would be empty (input length {length}, kernel {kernel})")
    q = (torch.arange(n_out) * stride)[None, :] + (torch.arange(kernel) * dilation)[:, None]
    i = q - pad_left  # position in unpadded coordinates, may fall in the padding
    if mode == "zeros":
        valid = (i >= 0) & (i < length)
        src = i.clamp(0, length - 1)
    else:
        valid = torch.ones_like(i, dtype=torch.bool)
        if mode == "reflect":
            src = torch.where(i < 0, -i, i)
            src = torch.where(src >= length, 2 * (length - 1) - src, src)
        elif mode == "replicate":
            src = i.clamp(0, length - 1)
        elif mode == "circular":
            src = i.remainder(length)
        else:
            raise ValueError(f"unsupported padding_mode {mode!r}")
    counts = torch.zeros(kernel, length, dtype=torch.float64)
    counts.scatter_add_(1, src, valid.to(torch.float64))
    return counts.to(device=device, dtype=torch.float32), n_out


def conv_geometry(
    module: nn.modules.conv._ConvNd, spatial: tuple[int, ...], device: torch.device
) -> list[tuple[torch.Tensor, int]]:
    """Per spatial dim, the count matrix and output length for this conv on this input size."""
    pads = module._reversed_padding_repeated_twice  # (last dim left, last dim right, …)
    mode = module.padding_mode
    dims = []
    for d, length in enumerate(spatial):
        back = len(spatial) - 1 - d
        dims.append(
            _offset_counts(
                length,
                module.kernel_size[d],
                module.stride[d],
                module.dilation[d],
                pads[2 * back],
                pads[2 * back + 1],
                mode,
                device,
            )
        )
    return dims


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 sums for fp16/bf16/fp32 activations; float64 ones stay float64
    (docs/algorithm.md §2)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _squares(chunk: torch.Tensor) -> torch.Tensor:
    if chunk.dtype in (torch.float32, torch.float64):
        return chunk.square()
    return chunk.float().square_()


def batch_sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """``Σ_b x[b]²`` in fp32, reducing in x's own memory order and in bounded chunks."""
    if x.numel() <= _REDUCE_CHUNK_ELEMENTS and x.is_contiguous():
        return _squares(x).sum(0)  # the common small case, in as few ops as possible
    # Walk the per-sample dims from outermost to innermost stride so channels_last is read
    # contiguously, then put the result back in logical order.
    order = sorted(range(1, x.dim()), key=lambda d: -x.stride(d))
    view = x.permute(0, *order)
    per_sample = max(1, math.prod(view.shape[1:]))
    rows = max(1, _REDUCE_CHUNK_ELEMENTS // per_sample)
    total = None
    for chunk in view.split(rows):
        part = _squares(chunk).sum(0)
        total = part if total is None else total.add_(part)
    inverse = [0] * len(order)
    for pos, d in enumerate(order):
        inverse[d - 1] = pos
    return total.permute(*inverse)


def channel_sum_of_squares(g: torch.Tensor) -> torch.Tensor:
    """``Σ g²`` per channel (dim 1) in fp32, in bounded batch chunks."""
    dims = [0, *range(2, g.dim())]
    if g.numel() <= _REDUCE_CHUNK_ELEMENTS:
        return _squares(g).sum(dims)
    rows = max(1, _REDUCE_CHUNK_ELEMENTS // max(1, math.prod(g.shape[1:])))
    total = None
    for chunk in g.split(rows):
        part = _squares(chunk).sum(dims)
        total = part if total is None else total.add_(part)
    return total


def conv_input_statistic(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """Ĥ for a conv layer: flat ``(C_in/groups · Πk [+ 1 for bias])`` fp32 vector."""
    n_spatial = len(module.kernel_size)
    if x.dim() == n_spatial + 1:  # unbatched input
        x = x.unsqueeze(0)
    batch = x.shape[0]
    spatial = tuple(x.shape[2:])
    squares = batch_sum_of_squares(x)  # (C_in, *spatial)
    per_group = module.in_channels // module.groups
    if module.groups > 1:
        squares = squares.reshape(module.groups, per_group, *spatial).sum(0)
    geometry = conv_geometry(module, spatial, squares.device)
    if len(geometry) == 2:  # Conv2d: M_h · X2[c] · M_wᵀ for every channel, two matmuls
        rows, cols = (counts.to(squares.dtype) for counts, _ in geometry)  # exact integers
        squares = rows @ squares @ cols.T
    else:
        for d, (counts, _) in enumerate(geometry):
            # contract spatial dim d (now at axis 1 + d) with M[k, l] over l
            counts = counts.to(squares.dtype)
            squares = torch.movedim(torch.movedim(squares, 1 + d, -1) @ counts.T, -1, 1 + d)
    n_positions = math.prod(n_out for _, n_out in geometry)
    h = squares.reshape(-1).mul_(1.0 / (batch * n_positions * module.groups))
    if module.bias is not None:
        h = torch.cat([h, h.new_ones(1)])
    return h


def conv_output_statistic(module: nn.modules.conv._ConvNd, g: torch.Tensor) -> torch.Tensor:
    """Ŝ for a conv layer: per output channel, mean of g² over batch and positions (fp32)."""
    if g.dim() == len(module.kernel_size) + 1:
        g = g.unsqueeze(0)
    return channel_sum_of_squares(g).mul_(g.shape[1] / g.numel())
