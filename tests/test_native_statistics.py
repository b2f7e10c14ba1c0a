"""The statistics ops (adafisher/statistic_ops.py): CPU kernels of ``adafisher._C`` and the
pure-PyTorch references, each against the torch backend's statistics (``statistics.py``,
themselves tested against the float64 definitions in test_statistics.py); the native backend's
statistics path end to end. Without ``adafisher._C`` only the reference rows run."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import adafisher
from adafisher import AdaFisher, AdaFisherW, autograd_statistics, statistic_ops, statistics
from adafisher.backends import native_statistics
from adafisher.backends.torch_backend import TorchBackend
from adafisher.factors import FactorBuffers
from adafisher.layers import LayerKind, factor_sizes

NATIVE = adafisher.native_available()
needs_native = pytest.mark.skipif(not NATIVE, reason="adafisher._C is not built")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

_ops = torch.ops.adafisher
# "native": through the dispatcher (the CPU kernel); "reference": the PyTorch implementation.
IMPLEMENTATIONS = {
    "native": pytest.param(
        {"channel_sum_of_squares": _ops.channel_sum_of_squares,
         "norm_input_statistic": _ops.norm_input_statistic,
         "conv_input_statistic": _ops.conv_input_statistic,
         "commit_statistics": _ops.commit_statistics},
        marks=needs_native, id="native"),
    "reference": pytest.param(
        {"channel_sum_of_squares": statistic_ops.channel_sum_of_squares_reference,
         "norm_input_statistic": statistic_ops.norm_input_statistic_reference,
         "conv_input_statistic": statistic_ops.conv_input_statistic_reference,
         "commit_statistics": statistic_ops.commit_statistics_reference},
        id="reference"),
}


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Same dtype (fp32, or float64 for float64 inputs); both sum the same values in that dtype,
    in different orders."""
    assert actual.dtype == expected.dtype == (
        torch.float64 if dtype == torch.float64 else torch.float32)
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * 1e-3)


def _random(shape, dtype, layout="contiguous", seed=0) -> torch.Tensor:
    """Fresh values of ``shape`` in a layout: row-major, channels_last, or a strided view."""
    generator = torch.Generator().manual_seed(seed)
    if layout == "strided":  # every other element of a wider tensor: no dense view
        wide = torch.randn(*shape[:-1], 2 * shape[-1], generator=generator, dtype=torch.float64)
        return (wide + 0.3).to(dtype)[..., ::2]
    x = (torch.randn(*shape, generator=generator, dtype=torch.float64) + 0.3).to(dtype)
    if layout == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    elif layout == "transposed":  # batch dim not outermost in memory
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    return x


@pytest.fixture
def poisoned_outputs():
    """Tensors the ops allocate start as NaN (torch fills uninitialized memory in deterministic
    mode): an output element a kernel forgets to write shows. Settings restored after."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.empty(3).isnan().all()
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.utils.deterministic.fill_uninitialized_memory = fill


# ---------------------------------------------------------------------------- conv Ĥ
CONVS = {
    "3x3-pad1": (lambda: nn.Conv2d(5, 4, 3, padding=1, bias=False), (3, 5, 9, 8)),
    "7x5-s2-d2-g3-bias": (lambda: nn.Conv2d(6, 9, (7, 5), stride=2, dilation=2, groups=3,
                                            padding=(3, 1)), (2, 6, 15, 13)),
    "1x1": (lambda: nn.Conv2d(7, 3, 1), (4, 7, 5, 6)),
    "1x1-stride2": (lambda: nn.Conv2d(4, 6, 1, stride=2, bias=False), (3, 4, 7, 9)),
    "same-even-kernel": (lambda: nn.Conv2d(3, 2, (4, 2), padding="same", dilation=(1, 3)),
                         (2, 3, 6, 11)),
    "nonsquare-s(1,3)-pad(0,2)": (lambda: nn.Conv2d(2, 5, (2, 3), stride=(1, 3),
                                                    padding=(0, 2)), (5, 2, 4, 10)),
    "depthwise": (lambda: nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=6), (2, 6, 5, 5)),
    "large-pad": (lambda: nn.Conv2d(2, 2, 3, padding=4, stride=3), (2, 2, 4, 5)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 5, stride=2, padding=3, groups=2), (3, 4, 17)),
    "conv3d": (lambda: nn.Conv3d(3, 4, (3, 2, 3), stride=(2, 1, 1), padding=(1, 0, 2)),
               (2, 3, 5, 4, 6)),
    "conv3d-g2-d2": (lambda: nn.Conv3d(4, 2, 2, dilation=2, groups=2, bias=False),
                     (2, 4, 5, 5, 5)),
}


def _conv_layouts(shape) -> list[str]:
    return ["contiguous", "transposed", "strided"] + (["channels_last"] if len(shape) in (4, 5)
                                                       else [])


CONV_CASES = [(name, layout) for name, (_, shape) in CONVS.items()
              for layout in _conv_layouts(shape)]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS.values())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("conv", "layout"), CONV_CASES,
                         ids=[f"{c}-{lay}" for c, lay in CONV_CASES])
def test_conv_input_statistic_matches_torch_backend(implementation, conv, layout, dtype,
                                                    poisoned_outputs):
    make, shape = CONVS[conv]
    module = make().to(torch.float64 if dtype == torch.float64 else torch.float32)
    x = _random(shape, dtype, layout, seed=len(conv))
    args = native_statistics._conv_arguments(module)
    got = implementation["conv_input_statistic"](x, *args)
    want = statistics.input_statistic(LayerKind.CONV, module, x)
    assert got.shape == (factor_sizes(LayerKind.CONV, module)[0],)
    _close(got, want, dtype)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS.values())
def test_conv_input_statistic_rejects_bad_arguments(implementation):
    conv = implementation["conv_input_statistic"]
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(RuntimeError, match="batch is empty"):
        conv(torch.randn(0, 4, 5, 5), [3, 3], [1, 1], [1, 1], [1, 1], [1, 1], 1, False)
    with pytest.raises(RuntimeError, match="batched"):
        conv(x[0], [3, 3], [1, 1], [1, 1], [1, 1], [1, 1], 1, False)
    if implementation is IMPLEMENTATIONS["native"].values[0]:
        with pytest.raises(RuntimeError, match="groups = 3"):
            conv(x, [3, 3], [1, 1], [1, 1], [1, 1], [1, 1], 3, False)
        with pytest.raises(RuntimeError, match="output would be empty"):
            conv(x, [7, 3], [1, 1], [1, 1], [0, 0], [0, 0], 1, False)


@needs_native
def test_conv_input_statistic_reads_large_inputs_in_parallel_tasks():
    """Sizes past the serial threshold (several row blocks and column chunks) and a thread
    count that does not change the result."""
    module = nn.Conv2d(24, 8, 3, padding=1, stride=2, groups=2)
    x = _random((70, 24, 23, 21), torch.float32, "channels_last", seed=3)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append(_ops.conv_input_statistic(x, *native_statistics._conv_arguments(
                module)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])
    _close(results[0], statistics.input_statistic(LayerKind.CONV, module, x), torch.float32)


# ------------------------------------------------------------------- Linear, norm Ĥ
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS.values())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("lead", "bias", "layout"), [
    (lead, bias, layout)
    for lead, bias in [((37,), True), ((3, 5), False), ((), True), ((2, 3, 300), True)]
    for layout in ["contiguous", "strided", "transposed"]
    if layout != "transposed" or len(lead) >= 2  # transposing needs two leading dims
])
def test_linear_input_statistic_matches_torch_backend(implementation, lead, bias, layout, dtype,
                                                      poisoned_outputs):
    module = nn.Linear(13, 4, bias=bias)
    x = _random((*lead, 13), dtype, layout, seed=7)
    got = implementation["channel_sum_of_squares"](x, x.dim() - 1, x.dim(),
                                                   1.0 / math.prod(lead), bias)
    _close(got, statistics.linear_input_statistic(module, x), dtype)


NORMS = {  # module, input shape
    "bn1d-2d": (lambda: nn.BatchNorm1d(5), (6, 5)),
    "bn1d-3d": (lambda: nn.BatchNorm1d(4), (3, 4, 7)),
    "bn2d": (lambda: nn.BatchNorm2d(6), (4, 6, 5, 3)),
    "bn3d": (lambda: nn.BatchNorm3d(3), (2, 3, 4, 3, 5)),
    "ln-1": (lambda: nn.LayerNorm(7), (5, 7)),
    "ln-seq": (lambda: nn.LayerNorm(6), (3, 4, 6)),
    "ln-2dims": (lambda: nn.LayerNorm((4, 5)), (2, 3, 4, 5)),
    "ln-unbatched": (lambda: nn.LayerNorm(8), (8,)),
}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS.values())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("norm", "layout"), [
    (norm, layout)
    for norm, (_, shape) in NORMS.items()
    for layout in ["contiguous", "channels_last", "strided"]
    if layout != "channels_last" or len(shape) in (4, 5)  # channels_last is 4-D/5-D only
])
def test_norm_input_statistic_matches_torch_backend(implementation, norm, layout, dtype,
                                                    poisoned_outputs):
    make, shape = NORMS[norm]
    module = make()
    kind = LayerKind.BATCHNORM if "bn" in norm else LayerKind.LAYERNORM
    x = _random(shape, dtype, layout, seed=11)
    batched = x if x.dim() >= 2 else x.unsqueeze(0)
    batch, positions = batched.shape[0], math.prod(batched.shape[2:])
    got = implementation["norm_input_statistic"](
        batched, 1, 2, 1.0 / (positions**4 * batch**2), batched.shape[1] / batch**2)
    _close(got, statistics.input_statistic(kind, module, x), dtype)
    if implementation is IMPLEMENTATIONS["native"].values[0]:  # the backend verb itself
        _close(native_statistics.input_statistic(kind, module, x),
               statistics.input_statistic(kind, module, x), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("norm", ["bn1d-2d", "bn1d-3d", "bn2d", "bn3d"])
def test_batchnorm_input_statistic_from_saved_mean_matches_torch_backend(norm, dtype):
    make, shape = NORMS[norm]
    module = make().to(torch.float64 if dtype == torch.float64 else dtype)
    x = _random(shape, dtype, seed=13).requires_grad_()
    output = module(x)
    want = autograd_statistics.batchnorm_input_statistic(output, x)
    assert want is not None
    with torch.no_grad():
        _close(native_statistics.batchnorm_input_statistic(output, x), want, dtype)
    module.eval()
    assert native_statistics.batchnorm_input_statistic(module(x), x) is None  # no batch mean


# ------------------------------------------------------------------------ commit (Ŝ)
COMMITS = {  # layer, output-gradient shape, layout
    "linear": (lambda: nn.Linear(3, 9), (4, 5, 9), "contiguous"),
    "linear-unbatched": (lambda: nn.Linear(3, 9), (9,), "contiguous"),
    "linear-strided": (lambda: nn.Linear(3, 9), (6, 9), "strided"),
    "linear-no-outputs": (lambda: nn.Linear(3, 0), (4, 0), "contiguous"),
    "conv2d": (lambda: nn.Conv2d(2, 6, 3), (3, 6, 5, 4), "contiguous"),
    "conv2d-channels_last": (lambda: nn.Conv2d(2, 6, 3), (3, 6, 5, 4), "channels_last"),
    "conv2d-transposed": (lambda: nn.Conv2d(2, 6, 3), (3, 6, 5, 4), "transposed"),
    "conv2d-1x1-out": (lambda: nn.Conv2d(2, 5, 3), (7, 5, 1, 1), "contiguous"),
    "conv2d-unbatched": (lambda: nn.Conv2d(2, 5, 3), (5, 4, 3), "contiguous"),
    "conv1d": (lambda: nn.Conv1d(2, 4, 3), (3, 4, 11), "strided"),
    "conv3d-channels_last": (lambda: nn.Conv3d(2, 3, 1), (2, 3, 4, 3, 2), "channels_last"),
    "batchnorm2d": (lambda: nn.BatchNorm2d(4), (3, 4, 5, 2), "channels_last"),
    "batchnorm-bias-grad": (lambda: nn.BatchNorm2d(4), (1, 4), "contiguous"),
    "batchnorm1d": (lambda: nn.BatchNorm1d(4), (6, 4), "contiguous"),
    "layernorm": (lambda: nn.LayerNorm(6), (3, 4, 6), "transposed"),
    "layernorm-2dims": (lambda: nn.LayerNorm((3, 4)), (2, 5, 3, 4), "strided"),
    "layernorm-bias-grad": (lambda: nn.LayerNorm((3, 4)), (1, 3, 4), "contiguous"),
}


def _commit_case(name: str, dtype: torch.dtype):
    make, shape, layout = COMMITS[name]
    module = make()
    kind = {nn.Linear: LayerKind.LINEAR, nn.BatchNorm2d: LayerKind.BATCHNORM,
            nn.BatchNorm1d: LayerKind.BATCHNORM, nn.LayerNorm: LayerKind.LAYERNORM}.get(
                type(module), LayerKind.CONV)
    factor_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    buffers = FactorBuffers(torch.device("cpu"), factor_dtype)
    buffers.add_layer("before", LayerKind.LINEAR, 3, 2)
    h_len, s_len = factor_sizes(kind, module)
    slot = buffers.add_layer("layer", kind, h_len, s_len)
    buffers.add_layer("after", LayerKind.LINEAR, 2, 3)
    generator = torch.Generator().manual_seed(17)
    # Poisoned: pending sums and counts already hold values (gradient accumulation).
    buffers.pending.copy_(torch.rand(buffers.total, generator=generator, dtype=torch.float64))
    buffers.pending_count.copy_(torch.tensor([1.0, 2.0, 3.0]))
    h_hat = torch.rand(h_len, generator=generator, dtype=torch.float64).to(factor_dtype)
    grad = _random(shape, dtype, layout, seed=19)
    batch = 3
    return buffers, slot, module, h_hat, grad, batch


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS.values())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", COMMITS)
def test_commit_statistics_matches_torch_backend(implementation, case, dtype, monkeypatch):
    buffers, slot, module, h_hat, grad, batch = _commit_case(case, dtype)
    want = FactorBuffers(buffers.device, buffers.dtype)
    want.pending, want.pending_count = buffers.pending.clone(), buffers.pending_count.clone()
    TorchBackend().commit_pass(want, slot, module, h_hat, grad, batch)
    calls = []

    def commit(*args):
        calls.append(args)
        implementation["commit_statistics"](*args)

    # the backend verb's arguments, served by the implementation under test
    monkeypatch.setattr(native_statistics, "_ops",
                        type("Ops", (), {"commit_statistics": staticmethod(commit)}))
    native_statistics.commit_pass(buffers, slot, module, h_hat, grad, batch)
    assert len(calls) == 1
    _close(buffers.pending, want.pending, dtype)
    outside = torch.ones(buffers.total, dtype=torch.bool)
    outside[slot.h_offset : slot.s_offset + slot.s_len] = False
    assert torch.equal(buffers.pending[outside], want.pending[outside])  # untouched, bit for bit
    assert buffers.pending_count.tolist() == [1.0, 3.0, 3.0]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS.values())
def test_commit_statistics_rejects_slices_outside_the_buffer(implementation):
    pending, count = torch.zeros(6), torch.zeros(2)
    native = implementation is IMPLEMENTATIONS["native"].values[0]
    with pytest.raises(RuntimeError, match="outside the pending buffer" if native else None):
        # Ŝ of 4 channels at offset 3 would run past the 6 entries
        implementation["commit_statistics"](pending, count, torch.ones(3), torch.ones(2, 4), 0,
                                            0, 3, 1, 2, False, 1.0)
    if native:
        with pytest.raises(RuntimeError, match="layer 2"):
            implementation["commit_statistics"](pending, count, torch.ones(3), torch.ones(2, 3),
                                                2, 0, 3, 1, 2, False, 1.0)


# ------------------------------------------------------------------------- op contracts
def _opcheck_cases():
    x4 = torch.randn(2, 4, 5, 6)
    return [
        (_ops.channel_sum_of_squares.default, (torch.randn(3, 5, 4), 2, 3, 0.25, True)),
        (_ops.channel_sum_of_squares.default, (x4.to(torch.bfloat16), 1, 2, 0.5, False)),
        (_ops.norm_input_statistic.default, (x4, 1, 2, 0.1, 2.0)),
        (_ops.norm_input_statistic.default, (torch.randn(4, dtype=torch.float64), 0, 1, 3.0,
                                             0.5)),
        (_ops.conv_input_statistic.default, (x4, [3, 2], [2, 1], [1, 2], [1, 0], [1, 1], 2,
                                             True)),
        (_ops.conv_input_statistic.default,
         (x4.contiguous(memory_format=torch.channels_last), [1, 1], [1, 1], [1, 1], [0, 0],
          [0, 0], 1, False)),
        (_ops.commit_statistics.default, (torch.rand(9), torch.rand(2), torch.rand(5),
                                          torch.randn(3, 4), 1, 0, 5, 1, 2, False, 0.5)),
        (_ops.commit_statistics.default, (torch.rand(9, dtype=torch.float64),
                                          torch.rand(2, dtype=torch.float64),
                                          torch.rand(5, dtype=torch.float64), torch.randn(1, 4),
                                          0, 4, 0, 1, 2, True, 0.5)),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_statistics_ops_declare_their_mutations():
    for name in ("channel_sum_of_squares", "norm_input_statistic", "conv_input_statistic"):
        schema = getattr(_ops, name).default._schema
        assert not any(a.alias_info is not None and a.alias_info.is_write
                       for a in schema.arguments), name
    schema = _ops.commit_statistics.default._schema
    assert {a.name for a in schema.arguments
            if a.alias_info is not None and a.alias_info.is_write} == {"pending",
                                                                       "pending_count"}
    meta = torch.device("meta")
    out = _ops.conv_input_statistic(torch.empty(2, 6, 5, 5, device=meta, dtype=torch.bfloat16),
                                    [3, 2], [1, 1], [1, 1], [0, 0], [0, 0], 3, True)
    assert out.shape == (2 * 6 + 1,) and out.dtype == torch.float32
    out = _ops.channel_sum_of_squares(torch.empty(3, 4, 5, device=meta, dtype=torch.float64),
                                      1, 3, 1.0, True)
    assert out.shape == (21,) and out.dtype == torch.float64


# ---------------------------------------------------------------- the native backend path
class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@needs_native
def test_native_backend_takes_statistics_through_the_ops():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.LayerNorm(64), nn.Linear(64, 2))
    opt = AdaFisher(model, factor_interval=1)
    assert opt.backend == "native"
    recorder = _OpNames()
    with recorder:
        model(torch.randn(2, 3, 4, 4)).sum().backward()
    names = recorder.names
    assert names.count("adafisher.conv_input_statistic") == 1
    assert names.count("adafisher.norm_input_statistic") == 2  # BatchNorm (saved mean), LayerNorm
    assert names.count("adafisher.channel_sum_of_squares") == 1  # Linear Ĥ
    assert names.count("adafisher.commit_statistics") == 4  # one per layer: Ĥ, Ŝ and count
    assert "aten.pow" not in names and "aten.square" not in names
    (buffers,) = opt._buffers.values()
    assert buffers.pending_count.tolist() == [1.0] * 4


@needs_native
def test_native_backend_empty_batch_and_reflect_padding():
    """A pass with no samples adds nothing; a reflect-padded conv takes the reference path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.Flatten(),
                          nn.Linear(48, 2))
    twin = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.Flatten(),
                         nn.Linear(48, 2))
    twin.load_state_dict(model.state_dict())
    ours = AdaFisher(model, factor_interval=1, gammas=(0.3, 0.3))
    want = AdaFisher(twin, factor_interval=1, gammas=(0.3, 0.3), backend="torch")
    assert ours.backend == "native"
    x = torch.randn(3, 2, 4, 4)
    for m, opt in ((model, ours), (twin, want)):
        m(torch.randn(0, 2, 4, 4)).sum().backward()  # empty: feeds nothing
        m(x).square().sum().backward()
        opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------- trajectories
class _ResNetStyle(nn.Module):
    """Strided, grouped, 1×1 and dilated convs, channels_last-friendly, BatchNorm, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.branch = nn.Sequential(
            nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False), nn.BatchNorm2d(8),
            nn.ReLU(inplace=True), nn.Conv2d(8, 12, 3, padding=2, dilation=2), nn.BatchNorm2d(12))
        self.shortcut = nn.Sequential(nn.Conv2d(8, 12, 1, stride=2, bias=False),
                                      nn.BatchNorm2d(12))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(torch.relu(self.branch(x) + self.shortcut(x)))


class _TransformerStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(13, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1, groups=4)  # a 1-D conv over the sequence
        self.layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=24, dropout=0.0,
                                                batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 13)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        return self.head(self.norm(self.layer(x)))


def _trajectory(make, data, backend: str, cls, settings, channels_last: bool = False):
    torch.manual_seed(0)
    model = make()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    gammas, lr = settings
    opt = cls(model, lr=lr, weight_decay=0.01, factor_interval=1, backend=backend,
              gammas=gammas)
    assert opt.backend == (backend if backend != "auto" else ("native" if NATIVE else "torch"))
    for x, y in data:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).flatten(0, -2), y.flatten()).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


# (gammas, lr): with the default gammas F ≈ damping, so lr = damping keeps steps O(lr) (a
# larger lr amplifies float rounding of either step past 1e-6 within a few steps)
GAMMAS = {"default": ((0.92, 0.008), 1e-3), "ema": ((0.3, 0.3), 1e-2)}


@pytest.mark.parametrize("gammas", GAMMAS.values(), ids=GAMMAS.keys())
@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW])
@pytest.mark.parametrize("channels_last", [False, True])
def test_resnet_style_trajectory_auto_matches_torch_backend(cls, channels_last, gammas):
    generator = torch.Generator().manual_seed(5)
    data = [(torch.randn(5, 3, 9, 8, generator=generator),
             torch.randint(0, 5, (5,), generator=generator)) for _ in range(5)]
    ours = _trajectory(_ResNetStyle, data, "auto", cls, gammas, channels_last)
    want = _trajectory(_ResNetStyle, data, "torch", cls, gammas, channels_last)
    for a, b in zip(ours, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gammas", GAMMAS.values(), ids=GAMMAS.keys())
@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW])
def test_transformer_style_trajectory_auto_matches_torch_backend(cls, gammas):
    generator = torch.Generator().manual_seed(6)
    data = [(torch.randint(0, 13, (3, 7), generator=generator),
             torch.randint(0, 13, (3, 7), generator=generator)) for _ in range(5)]
    ours = _trajectory(_TransformerStyle, data, "auto", cls, gammas)
    want = _trajectory(_TransformerStyle, data, "torch", cls, gammas)
    for a, b in zip(ours, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
