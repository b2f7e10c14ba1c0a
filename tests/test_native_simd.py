"""The two variants of the CPU statistics leaves in ``adafisher._C`` (csrc/cpu_leaves.*): the
baseline ISA and AVX2+FMA, picked at import from what the CPU supports and forced here with
``adafisher._C.set_cpu_isa`` (restored after every test). Each variant is compared with the
pure-PyTorch references (tested against the torch backend in test_native_statistics.py) and the
two with each other, on odd sizes, every layout and dtype the kernels take, poisoned outputs."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import pytest
import torch
from test_native_statistics import _random

import adafisher
from adafisher import statistic_ops

NATIVE = adafisher.native_available()
pytestmark = pytest.mark.skipif(not NATIVE, reason="adafisher._C is not built")
if NATIVE:
    from adafisher import _C

    SUPPORTED = _C.cpu_isas()
else:
    SUPPORTED = ()

ISAS = [
    pytest.param("baseline", id="baseline"),
    pytest.param("avx2", id="avx2", marks=pytest.mark.skipif(
        "avx2" not in SUPPORTED,
        reason="this CPU lacks AVX2/FMA (or the build is not x86-64 GCC/Clang): only the "
               "baseline leaves exist")),
]
needs_avx2 = pytest.mark.skipif(
    "avx2" not in SUPPORTED,
    reason="this CPU lacks AVX2/FMA (or the build is not x86-64 GCC/Clang): nothing to compare")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
_ops = torch.ops.adafisher


@contextlib.contextmanager
def cpu_isa(name: str) -> Iterator[None]:
    previous = _C.set_cpu_isa(name)
    try:
        yield
    finally:
        _C.set_cpu_isa(previous)


@pytest.fixture(autouse=True)
def isa_restored():
    """No test leaves another ISA active for later tests."""
    before = _C.cpu_isa() if NATIVE else None
    yield
    if NATIVE:
        assert _C.cpu_isa() == before


@pytest.fixture
def poisoned_outputs():
    """Tensors the ops allocate start as NaN: an output element a kernel forgets to write
    shows. Settings restored after."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
           rtol32: float = 2e-6) -> None:
    """Accumulation dtype (fp32, float64 for float64 inputs); same values summed in other orders
    or with FMA contraction."""
    assert actual.dtype == expected.dtype == (
        torch.float64 if dtype == torch.float64 else torch.float32)
    rtol = 1e-12 if dtype == torch.float64 else rtol32
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * 1e-3)


def _both(fn):
    """fn() under each ISA this CPU supports: {isa: result}."""
    results = {}
    for isa in SUPPORTED:
        with cpu_isa(isa):
            results[isa] = fn()
    return results


# ------------------------------------------------------------------------------ the switch
def test_cpu_isa_reports_switches_and_restores():
    assert "baseline" in SUPPORTED and _C.cpu_isa() in SUPPORTED
    best = "avx2" if "avx2" in SUPPORTED else "baseline"
    assert _C.cpu_isa() == best  # the best one is active unless a test forgot to restore
    for isa in SUPPORTED:
        with cpu_isa(isa):
            assert _C.cpu_isa() == isa
    assert _C.cpu_isa() == best
    with pytest.raises(ValueError, match="isa must be one of .*baseline.*got 'sse9'"):
        _C.set_cpu_isa("sse9")
    if "avx2" not in SUPPORTED:
        with pytest.raises(ValueError, match="got 'avx2'"):
            _C.set_cpu_isa("avx2")
    with pytest.raises(TypeError):
        _C.set_cpu_isa(2)
    assert _C.cpu_isa() == best


# --------------------------------------------------------------------------- fp16 / bf16
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_every_half_precision_value_converts_exactly(isa, dtype, poisoned_outputs):
    """The leaves convert fp16/bf16 bits themselves (no c10 inside): all 65,536 bit patterns,
    squared one per channel (exact in fp32, or inf as torch's), equal torch's conversion; in
    runs of 45 values (the lane loop, its tail and the pairwise sum) they match float64 sums."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    magnitude = x.float().abs()  # neither fp32 overflow nor underflow in the sums below
    moderate = x[(magnitude < 2.0**40) & ((magnitude > 2.0**-40) | (magnitude == 0))]
    runs = moderate[: moderate.numel() // 45 * 45].view(1, -1, 45)
    with cpu_isa(isa):
        squares = _ops.channel_sum_of_squares(x.view(1, -1), 1, 2, 1.0, False)
        run_squares = _ops.channel_sum_of_squares(runs, 1, 2, 1.0, False)
        run_sums = _ops.norm_input_statistic(runs, 1, 2, 1.0, 0.0)
    torch.testing.assert_close(squares, x.float().square(), rtol=0, atol=0, equal_nan=True)
    want = runs.double().square().sum(-1).squeeze(0)
    torch.testing.assert_close(run_squares.double(), want, rtol=1e-6, atol=0)
    dot = runs.double().sum(-1).square().sum()
    torch.testing.assert_close(run_sums[0].double(), dot, rtol=1e-5, atol=0)


# ---------------------------------------------------------------- per-channel reductions
# (shape, channel dims, layout): runs whose lengths are no multiple of 8/16/32 (lane loop plus
# tail), runs of 1 and 2, rows column-wise (Linear inputs, channels_last folds), gathers.
REDUCTIONS = {
    "nchw-runs-63": ((5, 3, 7, 9), (1, 2), "contiguous"),
    "nchw-runs-33": ((3, 4, 33), (1, 2), "contiguous"),
    "nchw-runs-2": ((9, 5, 2), (1, 2), "contiguous"),
    "nchw-runs-31-transposed": ((6, 5, 31), (1, 2), "transposed"),
    "runs-of-1": ((7, 5, 1, 1), (1, 2), "contiguous"),
    "linear-129": ((37, 129), (1, 2), "contiguous"),
    "linear-3d-17": ((3, 7, 17), (2, 3), "contiguous"),
    "channels_last": ((4, 13, 5, 7), (1, 2), "channels_last"),
    "channels_last-3d": ((2, 3, 4, 3, 5), (1, 2), "channels_last"),
    "strided": ((6, 11, 9), (1, 2), "strided"),
    "strided-channels-last-dim": ((5, 4, 23), (2, 3), "strided"),
    "layernorm-dims": ((3, 5, 3, 4), (2, 4), "contiguous"),
    "parallel-nchw": ((70, 13, 9, 11), (1, 2), "contiguous"),
    "parallel-rows": ((1500, 45), (1, 2), "contiguous"),
    "empty-batch": ((0, 5, 3, 3), (1, 2), "contiguous"),
    "empty-channels": ((4, 0, 3), (1, 2), "contiguous"),
}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", REDUCTIONS)
def test_channel_reductions_match_reference(isa, case, dtype, poisoned_outputs):
    shape, (c0, c1), layout = REDUCTIONS[case]
    x = _random(shape, dtype, layout, seed=len(case))
    with cpu_isa(isa):
        squares = _ops.channel_sum_of_squares(x, c0, c1, 0.25, True)
        norm = _ops.norm_input_statistic(x, c0, c1, 0.5, 3.0)
    _close(squares, statistic_ops.channel_sum_of_squares_reference(x, c0, c1, 0.25, True), dtype)
    want = statistic_ops.norm_input_statistic_reference(x, c0, c1, 0.5, 3.0)
    _close(norm, want, dtype, rtol32=1e-5)  # Σx per channel, squared: cancellation


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["nchw-runs-63", "channels_last", "strided", "linear-129",
                                  "empty-batch"])
def test_commit_statistics_matches_reference(isa, case, dtype):
    shape, (c0, c1), layout = REDUCTIONS[case]
    grad = _random(shape, dtype, layout, seed=7)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    channels = torch.Size(shape[c0:c1]).numel()
    generator = torch.Generator().manual_seed(5)
    # poisoned: pending holds earlier sums (gradient accumulation), beyond the slices too
    pending = torch.rand(4 + 3 + channels + 2, generator=generator, dtype=torch.float64).to(acc)
    count = torch.tensor([2.0, 5.0], dtype=acc)
    h_hat = torch.rand(3, generator=generator, dtype=torch.float64).to(acc)
    for sum_then_square in (False, True):
        want_p, want_c = pending.clone(), count.clone()
        statistic_ops.commit_statistics_reference(want_p, want_c, h_hat, grad, 1, 4, 7, c0, c1,
                                                  sum_then_square, 0.125)
        got_p, got_c = pending.clone(), count.clone()
        with cpu_isa(isa):
            _ops.commit_statistics(got_p, got_c, h_hat, grad, 1, 4, 7, c0, c1, sum_then_square,
                                   0.125)
        _close(got_p, want_p, dtype, rtol32=1e-5)
        assert torch.equal(got_p[:4], pending[:4]) and torch.equal(got_p[-2:], pending[-2:])
        assert got_c.tolist() == [2.0, 6.0]


@needs_avx2
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", REDUCTIONS)
def test_isas_agree_closely(case, dtype):
    """Same order of summation in both variants: they differ by FMA rounding only."""
    shape, (c0, c1), layout = REDUCTIONS[case]
    x = _random(shape, dtype, layout, seed=3)
    got = _both(lambda: _ops.channel_sum_of_squares(x, c0, c1, 1.0, False))
    tol = 1e-14 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got["avx2"], got["baseline"], rtol=tol, atol=0)
    sums = _both(lambda: _ops.norm_input_statistic(x, c0, c1, 1.0, 0.0))
    torch.testing.assert_close(sums["avx2"], sums["baseline"], rtol=tol, atol=0)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _same_bits_at_1_and_3_threads(isa: str, run) -> None:
    """run() → tensors, under ISA ``isa`` at 1 and at 3 threads: the same bits."""
    results = []
    with cpu_isa(isa):
        for n in (1, 3):
            with torch_threads(n):
                results.append(run())
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("isa", ISAS)
def test_results_do_not_depend_on_the_thread_count(isa):
    """Large enough to be split into tasks: the same bits at 1 and 3 threads."""
    x = _random((96, 16, 20, 20), torch.float32, "contiguous", seed=11)
    y = _random((96, 16, 20, 20), torch.float32, "channels_last", seed=12)
    _same_bits_at_1_and_3_threads(isa, lambda: (
        _ops.channel_sum_of_squares(x, 1, 2, 1.0, False),
        _ops.channel_sum_of_squares(y, 1, 2, 1.0, False),
        _ops.conv_input_statistic(x, [3, 3], [1, 1], [1, 1], [1, 1], [1, 1], 1, False),
        _ops.conv_input_statistic(y, [3, 3], [2, 2], [1, 1], [1, 1], [1, 1], 2, True),
    ))


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()),
    reason="the extension uses OpenMP only on Linux, with a torch built with OpenMP")
def test_kernels_run_on_torchs_threads():
    """ATen's at::parallel_for is a header template that runs inline unless the extension is
    compiled with OpenMP: every CPU kernel of a build without it ran on one thread. The build
    links torch's own OpenMP runtime, so torch.set_num_threads governs the kernels. (A build
    with another compiler than GCC has no OpenMP and fails here, on purpose.)"""
    assert _C.WITH_OPENMP == 1
    for n in (1, 3):
        with torch_threads(n):
            assert _C.parallel_threads() == n


@pytest.mark.parametrize("isa", ISAS)
def test_step_and_commit_do_not_depend_on_the_thread_count(isa):
    """The step splits a parameter into per-thread ranges (mid-row) and the commit splits its
    reduction: the same bits at 1 and 3 threads."""
    generator = torch.Generator().manual_seed(2)
    rows, cols = 61, 2053
    start = [torch.randn(rows, cols, generator=generator) for _ in range(3)]
    factors = torch.rand(rows + cols, generator=generator)
    grad_output = _random((48, 24, 17, 19), torch.float32, "contiguous", seed=4)

    def step_and_commit():
        p, g, m = (t.clone() for t in start)
        case = ([p], [g], [m], factors, torch.ones(2, dtype=torch.bool), [0], [0], [cols], [rows])
        _fused_step(case, [4], 0.01, 0.9, 1e-3, 0.05, True, False)
        pending, count = torch.zeros(64), torch.zeros(1)
        _ops.commit_statistics(pending, count, torch.ones(3), grad_output, 0, 0, 8, 1, 2, False,
                               0.5)
        return p, m, pending

    _same_bits_at_1_and_3_threads(isa, step_and_commit)


# ------------------------------------------------------------------------------- conv Ĥ
CONVS = {  # input shape, kernel, stride, dilation, pad before, pad after, groups, bias
    "3x3-pad1-odd": ((3, 5, 9, 11), [3, 3], [1, 1], [1, 1], [1, 1], [1, 1], 1, False),
    "resnet-8x8": ((4, 6, 8, 8), [3, 3], [1, 1], [1, 1], [1, 1], [1, 1], 1, True),
    "7x5-s2-d2-g3": ((2, 6, 15, 13), [7, 5], [2, 2], [2, 2], [3, 1], [3, 1], 3, True),
    "1x1-stride2": ((3, 4, 7, 9), [1, 1], [2, 2], [1, 1], [0, 0], [0, 0], 1, False),
    "asymmetric-pad": ((2, 3, 6, 19), [4, 2], [1, 3], [1, 3], [1, 2], [2, 1], 1, True),
    "conv1d": ((3, 4, 37), [5], [2], [1], [3], [3], 2, True),
    "conv3d": ((2, 3, 5, 4, 9), [3, 2, 3], [2, 1, 1], [1, 1, 1], [1, 0, 2], [1, 0, 2], 1,
               False),
}
CONV_CASES = [(name, layout) for name, (shape, *_) in CONVS.items()
              for layout in ["contiguous", "transposed", "strided"]
              + (["channels_last"] if len(shape) in (4, 5) else [])]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("conv", "layout"), CONV_CASES,
                         ids=[f"{c}-{lay}" for c, lay in CONV_CASES])
def test_conv_input_statistic_matches_reference(isa, conv, layout, dtype, poisoned_outputs):
    shape, *args = CONVS[conv]
    x = _random(shape, dtype, layout, seed=len(conv))
    with cpu_isa(isa):
        got = _ops.conv_input_statistic(x, *args)
    _close(got, statistic_ops.conv_input_statistic_reference(x, *args), dtype)


@needs_avx2
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("conv", "layout"), CONV_CASES,
                         ids=[f"{c}-{lay}" for c, lay in CONV_CASES])
def test_conv_isas_agree_closely(conv, layout, dtype):
    shape, *args = CONVS[conv]
    x = _random(shape, dtype, layout, seed=1)
    got = _both(lambda: _ops.conv_input_statistic(x, *args))
    tol = 1e-14 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got["avx2"], got["baseline"], rtol=tol, atol=0)


# ------------------------------------------------------------------------------ the fused step
# fp32 parameters with fp32 factors step through the leaves (one loop per ISA); the other
# dtypes and layouts take cpu_kernels.cpp's own loops, covered in test_native_ops.py.
STEP_SETTINGS = [  # weight_decay, decoupled, maximize
    pytest.param(0.0, False, False, id="no-decay"),
    pytest.param(0.05, False, False, id="l2"),
    pytest.param(0.05, True, False, id="decoupled"),
    pytest.param(0.05, False, True, id="l2-maximize"),
    pytest.param(0.0, True, True, id="maximize"),
]


def _fused_step(case, steps, lr, beta, damping, weight_decay, decoupled, maximize):
    params, grads, exp_avgs, factors, blended, layers, h_offsets, s_offsets, rows = case
    counts = [torch.tensor(float(s - 1)) for s in steps]  # the op counts +1
    _ops.fused_step(params, grads, exp_avgs, counts, factors, blended, layers, h_offsets,
                    s_offsets, rows, torch.tensor(lr, dtype=torch.float64), beta, damping,
                    weight_decay, decoupled, maximize)
    assert [c.item() for c in counts] == steps


def _step_case(layout: str, seed: int):
    from test_native_ops import _case

    return _case(torch.float32, layout, "cpu", torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "channels_last"])
@pytest.mark.parametrize(("weight_decay", "decoupled", "maximize"), STEP_SETTINGS)
def test_fused_step_matches_torch_backend(isa, layout, weight_decay, decoupled, maximize):
    """Odd sizes, layers with and without factors, untracked and empty parameters."""
    from test_native_ops import _expected

    case = _step_case(layout, seed=len(layout))
    steps = [1 + 2 * i for i in range(len(case[0]))]
    settings = (0.01, 0.9, 1e-3, weight_decay, decoupled, maximize)
    want_p, want_m = _expected(case, steps, *settings)
    with cpu_isa(isa):
        _fused_step(case, steps, *settings)
    for got, want in zip(case[0] + case[2], want_p + want_m):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("weight_decay", "decoupled", "maximize"), STEP_SETTINGS)
def test_fused_step_over_many_tasks_matches_torch_backend(isa, weight_decay, decoupled,
                                                          maximize):
    """100 007 elements: several parallel tasks, rows split between tasks, a vector tail."""
    from adafisher.functional import adafisher_update, preconditioner

    generator = torch.Generator().manual_seed(5)
    rows, cols = 97, 1031
    p, g, m = (torch.randn(rows, cols, generator=generator) for _ in range(3))
    factors = torch.rand(rows + cols, generator=generator)
    want_p, want_m = p.clone(), m.clone()
    fisher = preconditioner(factors[cols:], factors[:cols], 1e-3, p.shape)
    adafisher_update(want_p, -g if maximize else g, want_m, 7, fisher, lr=0.1, beta=0.8,
                     weight_decay=weight_decay, decoupled=decoupled)
    case = ([p], [g], [m], factors, torch.ones(2, dtype=torch.bool), [0], [0], [cols], [rows])
    # steps reach ~100× |p| where s·h + λ is small: p − step can cancel to a small value, so the
    # absolute tolerance is a few ulps of the largest term, not of the result
    largest = float(torch.maximum(p.abs(), (want_p - p).abs()).max())
    with cpu_isa(isa):
        _fused_step(case, [7], 0.1, 0.8, 1e-3, weight_decay, decoupled, maximize)
    torch.testing.assert_close(p, want_p, rtol=2e-6, atol=2e-6 * largest)
    torch.testing.assert_close(m, want_m, rtol=2e-6, atol=2e-6)


@needs_avx2
@pytest.mark.parametrize(("weight_decay", "decoupled", "maximize"), STEP_SETTINGS)
def test_fused_step_isas_agree_closely(weight_decay, decoupled, maximize):
    """The same operations in the same order: the variants differ by FMA rounding only."""
    results = {}
    for isa in SUPPORTED:
        case = _step_case("contiguous", seed=11)
        with cpu_isa(isa):
            _fused_step(case, [3] * len(case[0]), 0.01, 0.9, 1e-3, weight_decay, decoupled,
                        maximize)
        results[isa] = case[0] + case[2]
    for avx2, baseline in zip(results["avx2"], results["baseline"]):
        torch.testing.assert_close(avx2, baseline, rtol=1e-6, atol=1e-7)
