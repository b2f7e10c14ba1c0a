"""``adafisher::triton_fused_step`` and ``adafisher::triton_update_factors`` (triton_ops.py):
the schemas of ``adafisher/ops.py``, the results of its torch references, ``opcheck``, and
tracing that sees the Triton launches (``triton_kernel_wrapper_*`` nodes)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from kernel_testing import DEVICE, INTERPRETED, LOW_PRECISION, randn, rel_err

from adafisher import ops, triton_ops
from adafisher.kernels import fused_step

REPO = Path(__file__).resolve().parents[2]

# factor layout: layer 0 Linear 5→7 with bias: H [0, 6), S [6, 13); layer 1 conv 3→4 with a
# 3×2 kernel: H [13, 31), S [31, 35); layer 2 Linear 123→3: H [35, 158), S [158, 161);
# layer 3 (never blended: F = 1) H [161, 162), S [162, 163)
N_FACTORS = 163
# name → (shape, layer, h_offset, s_offset); layer −1: untracked
PARAMS = {
    "fc.weight": ((7, 5), 0, 0, 6),
    "fc.bias": ((7,), 0, 5, 6),
    "conv.weight": ((4, 3, 3, 2), 1, 13, 31),
    "wide.weight": ((3, 123), 2, 35, 158),
    "cold.weight": ((1, 1), 3, 161, 162),
    "free": ((3, 131), -1, 0, 0),
    "free_1d": ((431,), -1, 0, 0),
    "empty": ((0, 5), -1, 0, 0),
    "empty_tracked": ((0, 5), 2, 35, 158),
}


def _factors():
    factors = randn(N_FACTORS, seed=0).abs() * 0.5 + 0.01
    blended = torch.tensor([True] * 6 + [True, False], device=DEVICE)
    return factors, blended


def _problem(names, dtype, layout, seed, grad_dtype=None):
    """``(params, grads, momenta, step counts)``: fresh random values, never zero."""
    params, grads, momenta, steps = [], [], [], []
    for k, name in enumerate(names):
        shape = PARAMS[name][0]
        p = randn(*shape, dtype=dtype, seed=seed + 3 * k)
        g = randn(*shape, dtype=grad_dtype or dtype, seed=seed + 3 * k + 1)
        m = randn(*shape, dtype=dtype, seed=seed + 3 * k + 2) * 0.1
        if layout == "channels_last" and p.dim() == 4:
            p, g, m = (t.to(memory_format=torch.channels_last) for t in (p, g, m))
        if layout == "transposed" and p.dim() == 2:  # column-major: the reference path
            p, g, m = (t.t().contiguous().t() for t in (p, g, m))
        params.append(p)
        grads.append(g)
        momenta.append(m)
        steps.append(torch.tensor(float((5 * k) % 7), device=DEVICE))
    return params, grads, momenta, steps


def _meta(names):
    layers = [PARAMS[n][1] for n in names]
    h = [PARAMS[n][2] for n in names]
    s = [PARAMS[n][3] for n in names]
    rows = [PARAMS[n][0][0] if PARAMS[n][1] >= 0 else 1 for n in names]
    return layers, h, s, rows


def _step_both(names, *, dtype=torch.float32, layout="contiguous", wd=0.0, decoupled=False,
               maximize=False, grad_dtype=None, lr=3e-3):
    factors, blended = _factors()
    ours = _problem(names, dtype, layout, seed=10, grad_dtype=grad_dtype)
    ref = _problem(names, dtype, layout, seed=10, grad_dtype=grad_dtype)
    lr_t = torch.tensor(lr, dtype=torch.float64, device=DEVICE)
    args = (*_meta(names), lr_t, 0.9, 1e-3, wd, decoupled, maximize)
    torch.ops.adafisher.triton_fused_step(*ours, factors, blended, *args)
    ops.fused_step_reference(*ref, factors, blended, *args)
    return ours, ref


def _check_step(ours, ref, tol=1e-6):
    for k in range(len(ours[0])):
        for a, b in ((ours[0][k], ref[0][k]), (ours[2][k], ref[2][k])):
            assert a.stride() == b.stride()
            if a.numel() == 0:
                continue
            if a.dtype in LOW_PRECISION:  # one rounding of the same fp32 value: ≤ 1 ulp
                eps = torch.finfo(a.dtype).eps
                torch.testing.assert_close(a, b, rtol=eps, atol=0)
            else:
                assert rel_err(a, b) < tol, k
        assert torch.equal(ours[3][k], ref[3][k])  # the step was counted once


ALL = list(PARAMS)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
@pytest.mark.parametrize("mode", ["none", "l2", "decoupled", "maximize"])
def test_fused_step_matches_reference(dtype, mode):
    ours, ref = _step_both(ALL, dtype=dtype, wd=0.0 if mode in ("none", "maximize") else 0.05,
                           decoupled=mode == "decoupled", maximize=mode == "maximize")
    _check_step(ours, ref)


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_fused_step_layouts(layout):
    ours, ref = _step_both(ALL, layout=layout, wd=0.01, decoupled=True)
    _check_step(ours, ref)


def test_fused_step_float64_and_mixed_gradients():
    """float64 takes the reference inside the op; bf16 parameters with fp32 gradients fuse."""
    _check_step(*_step_both(["fc.weight", "free"], dtype=torch.float64), 1e-12)
    _check_step(*_step_both(["fc.weight", "free"], dtype=torch.bfloat16,
                            grad_dtype=torch.float32))


def test_fused_step_more_parameters_than_slots():
    names = [n for n in ALL for _ in range(3)]  # 27 parameters: two launches of one group
    assert len(names) > fused_step.SLOTS
    _check_step(*_step_both(names, wd=0.02))


def test_fused_step_writes_nothing_around_the_parameters():
    """Parameters and momenta inside NaN-poisoned buffers: the ragged ends stay masked."""
    names = ["free_1d", "fc.weight", "wide.weight"]
    factors, blended = _factors()
    params, grads, momenta, steps = _problem(names, torch.float32, "contiguous", seed=50)
    ref = _problem(names, torch.float32, "contiguous", seed=50)
    pad = 37
    bases = []
    for tensors in (params, momenta):
        for k, t in enumerate(tensors):
            base = torch.full((t.numel() + 2 * pad,), float("nan"), device=DEVICE)
            base[pad:pad + t.numel()] = t.reshape(-1)
            tensors[k] = base[pad:pad + t.numel()].view(t.shape)
            bases.append(base)
    lr = torch.tensor(3e-3, dtype=torch.float64, device=DEVICE)
    args = (*_meta(names), lr, 0.9, 1e-3, 0.02, True, False)
    torch.ops.adafisher.triton_fused_step(params, grads, momenta, steps, factors, blended, *args)
    ops.fused_step_reference(*ref, factors, blended, *args)
    _check_step((params, grads, momenta, steps), ref)
    for base in bases:
        assert base[:pad].isnan().all() and base[-pad:].isnan().all()


def test_fused_step_refusals_are_named():
    p = randn(4, 4)
    assert triton_ops.fused_refusal(p, p.double(), p, False, p) == (
        "dtype torch.float32 / gradient torch.float64")
    assert triton_ops.fused_refusal(p, p.t(), p, False, p) == (
        "gradient or momentum strides differ from the parameter's")
    assert triton_ops.fused_refusal(p.t(), p.t(), p.t(), True, p) == (
        "layout neither row-major nor channels_last")
    assert triton_ops.fused_refusal(p.t(), p.t(), p.t(), False, p) is None  # dense: F = 1
    assert triton_ops.fused_refusal(p, p, p, True, p.double()) == (
        "float64 factors (torch.float64)")


def test_fused_step_argument_errors():
    factors, blended = _factors()
    params, grads, momenta, steps = _problem(["fc.weight"], torch.float32, "contiguous", 1)
    lr = torch.tensor(1e-3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="rows"):
        torch.ops.adafisher.triton_fused_step(params, grads, momenta, steps, factors, blended,
                                              [0], [0], [6], [3], lr, 0.9, 1e-3, 0.0, False,
                                              False)
    with pytest.raises(ValueError, match="outside factors"):
        torch.ops.adafisher.triton_fused_step(params, grads, momenta, steps, factors, blended,
                                              [0], [0], [N_FACTORS], [7], lr, 0.9, 1e-3, 0.0,
                                              False, False)
    with pytest.raises(ValueError, match="grads has 0 entries"):
        torch.ops.adafisher.triton_fused_step(params, [], momenta, steps, factors, blended,
                                              [0], [0], [6], [7], lr, 0.9, 1e-3, 0.0, False,
                                              False)


# ------------------------------------------------------------------------- update_factors
SEGMENTS = [(1, 1), (2, 7), (124, 123), (1, 431), (37, 2), (5, 1)]


def _buffers(seed):
    bounds = [0]
    for h_len, s_len in SEGMENTS:
        bounds += [bounds[-1] + h_len, bounds[-1] + h_len + s_len]
    total = bounds[-1]
    n = len(SEGMENTS)
    factors = randn(total, seed=seed).abs() + 0.1
    pending = randn(total, seed=seed + 1).abs() * 3
    pending[bounds[7] + 3] = float("nan")  # layer 3's S: discarded and counted
    pending[bounds[8] + 1] = float("inf")  # layer 4's H
    count = torch.tensor([1.0, 0.0, 3.0, 2.0, 1.0, 4.0], device=DEVICE)
    blended = torch.tensor([True, False] * n, device=DEVICE)
    nonfinite = torch.arange(2 * n, device=DEVICE)
    offsets = torch.tensor(bounds, dtype=torch.int64, device=DEVICE)
    return [factors, pending, count, blended, nonfinite, offsets]


@pytest.mark.parametrize("gammas", [(0.08, 0.008), (0.95, 0.05), (0.0, 1.0)])
def test_update_factors_matches_reference(gammas):
    ours, ref = _buffers(3), _buffers(3)
    torch.ops.adafisher.triton_update_factors(*ours, *gammas, 1e-6)
    ops.update_factors_reference(*ref, *gammas, 1e-6)
    assert rel_err(ours[0], ref[0]) < 1e-6
    for a, b in zip(ours[1:], ref[1:]):
        assert torch.equal(a, b)
    assert ours[4].tolist()[7] == 8 and ours[4].tolist()[8] == 9  # the two non-finite vectors


def test_update_factors_with_nothing_pending_changes_nothing():
    ours = _buffers(4)
    ours[2].zero_()
    before = [t.clone() for t in ours]
    torch.ops.adafisher.triton_update_factors(*ours, 0.08, 0.008, 1e-6)
    for a, b in zip(ours, before):
        if a.data_ptr() != ours[1].data_ptr():  # pending is cleared either way
            assert torch.equal(a, b)


def test_update_factors_offsets_count_is_checked():
    ours = _buffers(5)
    ours[5] = ours[5][:-1]
    with pytest.raises(ValueError, match="segment_offsets"):
        torch.ops.adafisher.triton_update_factors(*ours, 0.08, 0.008, 1e-6)


# ------------------------------------------------------------------------------ schemas
def _signature(op) -> list[tuple[str, bool]]:
    """(type, written) per argument, and the returns: what callers and compile rely on."""
    schema = op.default._schema
    args = [(str(a.type), bool(a.alias_info and a.alias_info.is_write)) for a in schema.arguments]
    return args + [("->", False)] + [(str(r.type), False) for r in schema.returns]


@pytest.mark.parametrize("name", ["fused_step", "update_factors"])
def test_schemas_are_those_of_the_reference_ops(name):
    ours = getattr(torch.ops.adafisher, f"triton_{name}")
    theirs = getattr(torch.ops.adafisher, name)
    assert _signature(ours) == _signature(theirs)
    assert [a.name for a in ours.default._schema.arguments] == [
        a.name for a in theirs.default._schema.arguments]


def test_opcheck_fused_step():
    factors, blended = _factors()
    names = ["fc.weight", "fc.bias", "conv.weight", "free"]
    problem = _problem(names, torch.float32, "contiguous", seed=20)
    lr = torch.tensor(1e-3, dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(torch.ops.adafisher.triton_fused_step.default,
                          (*problem, factors, blended, *_meta(names), lr, 0.9, 1e-3, 0.01,
                           True, False))


def test_opcheck_update_factors():
    torch.library.opcheck(torch.ops.adafisher.triton_update_factors.default,
                          (*_buffers(6), 0.08, 0.008, 1e-6))


def test_compiled_call_is_one_graph_and_matches_eager():
    """``torch.compile`` takes the op without a graph break; under the interpreter the traced
    call runs the torch reference (an interpreted kernel cannot be traced)."""
    names = ["fc.weight", "fc.bias", "free"]
    lr = torch.tensor(2e-3, dtype=torch.float64, device=DEVICE)

    def step(params, grads, momenta, steps, factors, blended, lr):
        torch.ops.adafisher.triton_fused_step(params, grads, momenta, steps, factors, blended,
                                              *_meta(names), lr, 0.9, 1e-3, 0.0, False, False)

    torch._dynamo.reset()
    try:
        factors, blended = _factors()
        eager = _problem(names, torch.float32, "contiguous", seed=30)
        compiled = _problem(names, torch.float32, "contiguous", seed=30)
        explained = torch._dynamo.explain(step)(*compiled, factors, blended, lr)
        assert explained.graph_count == 1 and explained.graph_break_count == 0
        compiled = _problem(names, torch.float32, "contiguous", seed=30)
        torch.compile(step, backend="aot_eager", fullgraph=True)(*compiled, factors, blended,
                                                                 lr)
        step(*eager, factors, blended, lr)
        _check_step(compiled, eager)
    finally:
        torch._dynamo.reset()


# Without the interpreter (real JIT functions) tracing records the launches; no GPU needed
# on the meta device (mutation analysis needs a GPU target: without one, torch assumes every
# argument is mutated and says so in a warning).
_TRACE = textwrap.dedent("""
    import torch
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from adafisher import triton_ops
    assert not triton_ops.INTERPRETED and triton_ops.TRACEABLE
    meta = dict(device="meta")
    params = [torch.empty(7, 5, **meta), torch.empty(3, 123, **meta)]
    grads = [torch.empty_like(p) for p in params]
    momenta = [torch.empty_like(p) for p in params]
    steps = [torch.empty((), **meta) for p in params]
    factors = torch.empty(20, **meta)
    blended = torch.empty(2, dtype=torch.bool, **meta)
    lr = torch.empty((), dtype=torch.float64, **meta)
    pending, count = torch.empty(20, **meta), torch.empty(1, **meta)
    nonfinite = torch.empty(2, dtype=torch.int64, **meta)
    offsets = torch.empty(3, dtype=torch.int64, **meta)

    def f(params, grads, momenta, steps, factors, blended, lr, pending, count, nonfinite,
          offsets):
        torch.ops.adafisher.triton_update_factors(factors, pending, count, blended, nonfinite,
                                                  offsets, 0.08, 0.008, 1e-6)
        torch.ops.adafisher.triton_fused_step(params, grads, momenta, steps, factors, blended,
                                              [0, -1], [0, 0], [5, 0], [7, 1], lr, 0.9, 1e-3,
                                              0.0, False, False)

    gm = make_fx(dispatch_functionalize(f))(params, grads, momenta, steps, factors, blended,
                                            lr, pending, count, nonfinite, offsets)
    for node in gm.graph.nodes:
        if node.op == "call_function" and "triton_kernel_wrapper" in str(node.target):
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            print(node.target.__name__, kernel.fn.__name__)
""")


@pytest.mark.skipif(not triton_ops.TRACEABLE, reason="torch without triton_op/wrap_triton")
def test_tracing_sees_the_triton_launches():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _TRACE], env=env, capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split("\n")[:2] == [
        "triton_kernel_wrapper_functional _blend_kernel",
        "triton_kernel_wrapper_functional _step_kernel",
    ], proc.stdout


@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs a GPU")
def test_inductor_compiles_the_launches_on_a_gpu():
    """On a GPU: the compiled (Inductor) call matches eager, the kernels inside the graph."""
    names = ["fc.weight", "conv.weight", "free"]
    lr = torch.tensor(2e-3, dtype=torch.float64, device=DEVICE)

    def step(params, grads, momenta, steps, factors, blended, lr):
        torch.ops.adafisher.triton_fused_step(params, grads, momenta, steps, factors, blended,
                                              *_meta(names), lr, 0.9, 1e-3, 0.01, True, False)

    torch._dynamo.reset()
    try:
        factors, blended = _factors()
        eager = _problem(names, torch.float32, "channels_last", seed=40)
        compiled = _problem(names, torch.float32, "channels_last", seed=40)
        torch.compile(step, fullgraph=True)(*compiled, factors, blended, lr)
        step(*eager, factors, blended, lr)
        _check_step(compiled, eager)
    finally:
        torch._dynamo.reset()
