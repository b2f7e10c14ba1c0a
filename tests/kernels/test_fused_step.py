"""kernels/fused_step.py through ``adafisher::triton_fused_step`` against
``adafisher.functional.adafisher_update`` (SPEC §5, §6)."""

from __future__ import annotations

import random
from typing import NamedTuple

import pytest
import torch
from kernel_testing import DEVICE, LOW_PRECISION, randn, rel_err

from adafisher import triton_ops  # noqa: F401  (registers the ops)
from adafisher.functional import adafisher_update, preconditioner
from adafisher.kernels import fused_step
from adafisher.kernels.fused_step import division_magic


class FactorPlace(NamedTuple):
    """Where a parameter viewed as (rows, cols) reads F: S at s_offset, H at h_offset."""

    layer: int
    cols: int
    h_offset: int
    s_offset: int


# factor layout: layer 0 (Linear 5→7 with bias): H [0, 6), S [6, 13); layer 1 (conv 3→4,
# 3×2 kernel): H [13, 32), S [32, 36); layer 2 (BatchNorm 4): H [36, 38), S [38, 42);
# layer 3 (Linear 1→1, no bias): H [42, 43), S [43, 44) — never blended, so F = 1.
N_FACTORS = 44
INDEX = {
    "fc.weight": FactorPlace(0, 5, 0, 6),
    "fc.bias": FactorPlace(0, 1, 5, 6),
    "conv.weight": FactorPlace(1, 18, 13, 32),
    "bn.weight": FactorPlace(2, 1, 36, 38),
    "bn.bias": FactorPlace(2, 1, 37, 38),
    "tiny.weight": FactorPlace(3, 1, 42, 43),
}
SHAPES = {
    "fc.weight": (7, 5), "fc.bias": (7,), "conv.weight": (4, 3, 3, 2), "bn.weight": (4,),
    "bn.bias": (4,), "tiny.weight": (1, 1), "free": (3, 123), "free_1d": (431,),
}


def _factors() -> tuple[torch.Tensor, torch.Tensor]:
    factors = randn(N_FACTORS, seed=0).abs() * 0.5 + 0.01
    blended = torch.tensor([True, True, True, True, True, True, True, False], device=DEVICE)
    return factors, blended


def _problem(names, dtype, grad_dtype, channels_last, seed):
    """Parameters, gradients and momenta (random, never zero) for ``names``."""
    out = []
    for k, name in enumerate(names):
        shape = SHAPES[name]
        p = randn(*shape, dtype=dtype, seed=seed + 3 * k)
        g = randn(*shape, dtype=grad_dtype, seed=seed + 3 * k + 1)
        m = randn(*shape, dtype=dtype, seed=seed + 3 * k + 2) * 0.1
        if channels_last and p.dim() == 4:
            p, g, m = (t.to(memory_format=torch.channels_last) for t in (p, g, m))
        out.append((name, p, g, m))
    return out


def _reference(problem, steps, factors, blended, *, lr, beta, wd, damping, decoupled):
    ready = blended.view(-1, 2).all(1).tolist()
    for (name, p, g, m), t in zip(problem, steps):
        index = INDEX.get(name)
        fisher = None
        if index is not None and ready[index.layer]:
            fisher = preconditioner(factors[index.s_offset : index.s_offset + p.shape[0]],
                                    factors[index.h_offset : index.h_offset + index.cols],
                                    damping, p.shape)
        adafisher_update(p, g, m, t, fisher, lr=lr, beta=beta, weight_decay=wd,
                         decoupled=decoupled)


def _run(names, *, dtype=torch.float32, grad_dtype=None, channels_last=False, wd=0.0,
         decoupled=False, steps=None, block=None, chunk=None, lr=3e-3):
    grad_dtype = grad_dtype or dtype
    steps = steps or [1 + (3 * k) % 5 for k in range(len(names))]
    factors, blended = _factors()
    ours = _problem(names, dtype, grad_dtype, channels_last, seed=100)
    ref = _problem(names, dtype, grad_dtype, channels_last, seed=100)
    hyper = dict(lr=lr, beta=0.9, damping=1e-3)
    counts = [torch.tensor(float(t - 1), device=DEVICE) for t in steps]  # the op counts
    places = [INDEX.get(name) for name, *_ in ours]
    with pytest.MonkeyPatch.context() as patch:
        if block is not None:
            patch.setattr(fused_step, "tile_sizes", lambda largest, gpu: (block, chunk))
        torch.ops.adafisher.triton_fused_step(
            [p for _, p, _, _ in ours], [g for _, _, g, _ in ours], [m for *_, m in ours],
            counts, factors, blended, [-1 if x is None else x.layer for x in places],
            [0 if x is None else x.h_offset for x in places],
            [0 if x is None else x.s_offset for x in places],
            [p.shape[0] if x is not None else 1 for (_, p, _, _), x in zip(ours, places)],
            torch.tensor(lr, dtype=torch.float64, device=DEVICE), 0.9, 1e-3, wd, decoupled,
            False)
    assert [int(c) for c in counts] == steps
    _reference(ref, steps, factors, blended, wd=wd, decoupled=decoupled, **hyper)
    return ours, ref


def _check(ours, ref, tol: float) -> None:
    for (name, p, _, m), (_, p_ref, _, m_ref) in zip(ours, ref):
        assert p.stride() == p_ref.stride()
        if p.dtype in LOW_PRECISION:  # one rounding of the same fp32 value: at most 1 ulp
            ulp = torch.finfo(p.dtype).eps
            torch.testing.assert_close(p, p_ref, rtol=ulp, atol=0, msg=name)
            torch.testing.assert_close(m, m_ref, rtol=ulp, atol=0, msg=name)
        else:
            assert rel_err(p, p_ref) < tol, name
            assert rel_err(m, m_ref) < tol, name


ALL = list(SHAPES)


@pytest.mark.parametrize("mode", ["none", "l2", "decoupled"])
def test_all_parameter_kinds_fp32(mode: str) -> None:
    ours, ref = _run(ALL, wd=0.0 if mode == "none" else 0.05, decoupled=mode == "decoupled")
    _check(ours, ref, 1e-6)


def test_channels_last_conv_weight() -> None:
    ours, ref = _run(["conv.weight", "fc.weight"], channels_last=True, wd=0.01, decoupled=True)
    _check(ours, ref, 1e-6)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_params(dtype: torch.dtype) -> None:
    ours, ref = _run(ALL, dtype=dtype, wd=0.01)
    _check(ours, ref, 0)


def test_low_precision_params_with_fp32_grads() -> None:
    ours, ref = _run(["fc.weight", "bn.bias", "free"], dtype=torch.bfloat16,
                     grad_dtype=torch.float32)
    _check(ours, ref, 0)


def test_many_chunks_per_parameter() -> None:
    """Chunks that start mid-row (row/column recovered from the chunk start)."""
    ours, ref = _run(ALL, block=8, chunk=16, channels_last=True, wd=0.02, decoupled=True)
    _check(ours, ref, 1e-6)


def test_steps_differ_between_parameters() -> None:
    ours, ref = _run(["fc.weight", "fc.bias", "free"], steps=[1, 7, 250])
    _check(ours, ref, 1e-6)


def test_no_factors_at_all() -> None:
    """Only untracked parameters: stand-in factor buffers, F = 1."""
    ours, ref = _run(["free", "free_1d"], wd=0.1)
    _check(ours, ref, 1e-6)


def test_division_magic_is_exact() -> None:
    rng = random.Random(0)
    divisors = list(range(1, 600)) + [rng.randrange(1, 2**31) for _ in range(300)]
    divisors += [2**k for k in range(31)] + [2**k + 1 for k in range(30)] + [2**31 - 1]
    for d in divisors:
        magic, shift = division_magic(d)
        assert 0 < magic < 2**32
        for n in (0, 1, d - 1, d, d + 1, 2**31 - 1, (2**31 - 1) // d * d, rng.randrange(2**31)):
            if 0 <= n < 2**31:
                assert (n * magic) >> shift == n // d, (n, d)
    with pytest.raises(ValueError):
        division_magic(0)
