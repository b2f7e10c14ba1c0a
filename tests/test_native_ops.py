"""The ``adafisher`` ops (adafisher/ops.py): native kernels (``adafisher._C``) and the reference
implementation against the torch backend; the native backend's trajectories against the torch
backend's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adafisher
from adafisher import AdaFisher, AdaFisherW, ops
from adafisher.backends import torch_backend
from adafisher.factors import FactorBuffers
from adafisher.functional import adafisher_update, preconditioner
from adafisher.layers import LayerKind

NATIVE = adafisher.native_available()
needs_native = pytest.mark.skipif(not NATIVE, reason="adafisher._C is not built")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ops.native_available("cuda")
                     else [])
TOLERANCE = {torch.float32: 2e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2,
             torch.float16: 1e-3}


def _native_step(*args) -> None:
    torch.ops.adafisher.fused_step(*args)


def _reference_step(*args) -> None:
    ops.fused_step_reference(*args)


IMPLEMENTATIONS = {"native": _native_step, "reference": _reference_step}


def _case(dtype: torch.dtype, layout: str, device: str, generator: torch.Generator):
    """Parameters of odd sizes in one layout, their factor placement, and F = 1 extras."""
    shapes = {  # shape, rows (None: untracked)
        "contiguous": [((7, 13), 7), ((7,), 7), ((5, 3, 3, 3), 5), ((11,), None), ((0, 4), None)],
        "channels_last": [((5, 3, 3, 3), 5), ((6, 2, 1, 5), 6)],
        "transposed": [((9, 6), 9), ((4, 10), None)],
    }[layout]

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device, dtype)

    params, grads, exp_avgs = [], [], []
    layers, h_offsets, s_offsets, rows = [], [], [], []
    offset = 0
    for layer, (shape, n_rows) in enumerate(shapes):
        if layout == "transposed":  # a non-contiguous view: p.t() of a (cols, rows) tensor
            p, g, m = (rand(*reversed(shape)).t() for _ in range(3))
        else:
            p, g, m = rand(*shape), rand(*shape), rand(*shape)
            if layout == "channels_last":
                p, g, m = (t.contiguous(memory_format=torch.channels_last) for t in (p, g, m))
        params.append(p)
        grads.append(g)
        exp_avgs.append(m)
        if n_rows is None:
            layers += [-1]
            h_offsets += [0]
            s_offsets += [0]
            rows += [1]
            continue
        cols = p.numel() // n_rows
        layers.append(layer)
        h_offsets.append(offset)
        s_offsets.append(offset + cols)
        rows.append(n_rows)
        offset += cols + n_rows
    factor_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    factors = torch.rand(offset, generator=generator, dtype=torch.float64).to(device, factor_dtype)
    blended = torch.ones(2 * len(shapes), dtype=torch.bool, device=device)
    blended[0] = False  # layer 0 has no factors yet: F = 1
    return params, grads, exp_avgs, factors, blended, layers, h_offsets, s_offsets, rows


def _expected(case, steps, lr, beta, damping, weight_decay, decoupled, maximize):
    """The torch backend's update (functional.adafisher_update), parameter by parameter."""
    params, grads, exp_avgs, factors, blended, layers, h_offsets, s_offsets, rows = case
    out_p = [p.clone() for p in params]
    out_m = [m.clone() for m in exp_avgs]
    ready = blended.view(-1, 2).all(1).tolist()
    for i, p in enumerate(out_p):
        fisher = None
        if layers[i] >= 0 and ready[layers[i]]:
            cols = p.numel() // rows[i]
            fisher = preconditioner(factors[s_offsets[i] : s_offsets[i] + rows[i]],
                                    factors[h_offsets[i] : h_offsets[i] + cols], damping, p.shape)
        grad = -grads[i] if maximize else grads[i]
        adafisher_update(p, grad, out_m[i], steps[i], fisher, lr=lr, beta=beta,
                         weight_decay=weight_decay, decoupled=decoupled)
    return out_p, out_m


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("decoupled", "maximize"), [(False, False), (True, False), (False, True)])
def test_fused_step_matches_torch_backend(implementation, device, layout, dtype, decoupled,
                                          maximize):
    if implementation == "native" and not NATIVE:
        pytest.skip("adafisher._C is not built")
    generator = torch.Generator().manual_seed(hash((layout, str(dtype), decoupled)) % 2**31)
    case = _case(dtype, layout, device, generator)
    steps = [1 + 3 * i for i in range(len(case[0]))]
    lr, beta, damping, weight_decay = 0.01, 0.9, 1e-3, 0.05
    want_p, want_m = _expected(case, steps, lr, beta, damping, weight_decay, decoupled, maximize)
    params, grads, exp_avgs, factors, blended, layers, h_offsets, s_offsets, rows = case
    layouts = [p.stride() for p in params]
    counts = [torch.tensor(float(s - 1), device=device) for s in steps]  # the op counts +1
    IMPLEMENTATIONS[implementation](
        params, grads, exp_avgs, counts,
        factors, blended, layers, h_offsets, s_offsets, rows,
        torch.tensor(lr, dtype=torch.float64, device=device), beta, damping, weight_decay,
        decoupled, maximize,
    )
    tol = TOLERANCE[dtype]
    for i in range(len(params)):
        assert params[i].stride() == layouts[i]  # updated in place, layout kept
        torch.testing.assert_close(params[i], want_p[i], rtol=tol, atol=tol)
        torch.testing.assert_close(exp_avgs[i], want_m[i], rtol=tol, atol=tol)
    assert [c.item() for c in counts] == steps


@needs_native
def test_fused_step_large_parameter_runs_in_parallel_chunks():
    """Sizes across the per-task grain and a row split inside a task."""
    generator = torch.Generator().manual_seed(0)
    rows, cols = 97, 1031  # 100 007 elements, several tasks, rows split across tasks
    p, g, m = (torch.randn(rows, cols, generator=generator) for _ in range(3))
    factors = torch.rand(rows + cols, generator=generator)
    blended = torch.ones(2, dtype=torch.bool)
    want_p, want_m = p.clone(), m.clone()
    fisher = preconditioner(factors[cols:], factors[:cols], 1e-3, p.shape)
    adafisher_update(want_p, g, want_m, 7, fisher, lr=0.1, beta=0.8, weight_decay=0.0,
                     decoupled=False)
    # steps reach ~100× |p| where s·h + λ is small and p − step can cancel: the absolute
    # tolerance is a few ulps of the largest term
    largest = float(torch.maximum(p.abs(), (want_p - p).abs()).max())
    torch.ops.adafisher.fused_step([p], [g], [m], [torch.tensor(6.0)], factors, blended, [0],
                                   [0], [cols], [rows], torch.tensor(0.1, dtype=torch.float64),
                                   0.8, 1e-3, 0.0, False, False)
    torch.testing.assert_close(p, want_p, rtol=2e-6, atol=2e-6 * largest)
    torch.testing.assert_close(m, want_m)


def _buffers(device: str, generator: torch.Generator, dtype=torch.float32) -> FactorBuffers:
    buffers = FactorBuffers(torch.device(device))
    for n, (h_len, s_len) in enumerate([(5, 3), (1, 9), (17, 2), (4, 4), (0, 3)]):
        buffers.add_layer(f"layer{n}", LayerKind.LINEAR, h_len, s_len)
    total = buffers.total

    def rand(n):
        return torch.rand(n, generator=generator, dtype=torch.float64).to(device, dtype)

    buffers.factors = rand(total)
    buffers.pending = rand(total) * 5
    buffers.pending_count = torch.tensor([2.0, 0.0, 1.0, 3.0, 1.0], device=device, dtype=dtype)
    # Poison: a NaN in layer 2's S, garbage pending in layer 1 (nothing pending there).
    buffers.pending[buffers.slots[2].s_offset] = float("nan")
    buffers.pending[buffers.slots[1].h_offset] = float("inf")
    buffers.blended[3] = True
    buffers.nonfinite[0] = 4
    return buffers


def _segment_offsets(buffers: FactorBuffers) -> torch.Tensor:
    bounds = [0] + [b for s in buffers.slots for b in (s.s_offset, s.s_offset + s.s_len)]
    return torch.tensor(bounds, dtype=torch.int64, device=buffers.device)


@pytest.mark.parametrize("implementation", ["native", "reference"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_update_factors_matches_torch_backend(implementation, device, dtype):
    if implementation == "native" and not NATIVE:
        pytest.skip("adafisher._C is not built")
    generator = torch.Generator().manual_seed(3)
    ours, want = _buffers(device, generator, dtype), None
    want = _buffers(device, torch.Generator().manual_seed(3), dtype)
    if dtype == torch.float32:
        torch_backend.update_factors(want, (0.3, 0.6))
    else:  # the torch backend's whole-buffer ops, on float64 buffers
        ops.update_factors_reference(want.factors, want.pending, want.pending_count,
                                     want.blended, want.nonfinite, _segment_offsets(want), 0.7,
                                     0.6, torch_backend.NORMALIZATION_EPS)
    before = ours.factors.clone()
    update = (torch.ops.adafisher.update_factors if implementation == "native"
              else ops.update_factors_reference)
    update(ours.factors, ours.pending, ours.pending_count, ours.blended, ours.nonfinite,
           _segment_offsets(ours), 0.7, 0.6, torch_backend.NORMALIZATION_EPS)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(ours.factors, want.factors, rtol=tol, atol=tol)
    assert torch.equal(ours.blended, want.blended)
    assert torch.equal(ours.nonfinite, want.nonfinite)
    assert ours.nonfinite.tolist() == [4, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert not ours.pending.any() and not ours.pending_count.any()
    # layer 1 had nothing pending, layer 2's S was discarded: bit-for-bit unchanged
    for slot, seg in ((ours.slots[1], "h"), (ours.slots[1], "s"), (ours.slots[2], "s")):
        start = slot.h_offset if seg == "h" else slot.s_offset
        length = slot.h_len if seg == "h" else slot.s_len
        assert torch.equal(ours.factors[start : start + length], before[start : start + length])
    # Nothing pending: launching changes nothing.
    snapshot = (ours.factors.clone(), ours.blended.clone(), ours.nonfinite.clone())
    update(ours.factors, ours.pending, ours.pending_count, ours.blended, ours.nonfinite,
           _segment_offsets(ours), 0.7, 0.6, torch_backend.NORMALIZATION_EPS)
    assert torch.equal(ours.factors, snapshot[0]) and torch.equal(ours.blended, snapshot[1])
    assert torch.equal(ours.nonfinite, snapshot[2])


def test_ops_have_fakes_and_mutation_annotations():
    step = torch.ops.adafisher.fused_step.default._schema
    mutated = {a.name for a in step.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == {"params", "exp_avgs", "steps"}
    update = torch.ops.adafisher.update_factors.default._schema
    mutated = {a.name for a in update.arguments
               if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == {"factors", "pending", "pending_count", "blended", "nonfinite"}
    # Meta tensors run the fake: shapes-only tracing works.
    meta = torch.device("meta")
    p = torch.empty(3, 4, device=meta)
    torch.ops.adafisher.fused_step(
        [p], [p.clone()], [p.clone()], [torch.empty((), device=meta)],
        torch.empty(7, device=meta), torch.empty(2, dtype=torch.bool, device=meta), [0], [0], [4],
        [3], torch.empty((), dtype=torch.float64, device=meta), 0.9, 1e-3, 0.0, False, False,
    )
    torch.library.opcheck(
        torch.ops.adafisher.update_factors.default,
        (torch.rand(6), torch.rand(6), torch.tensor([1.0]), torch.zeros(2, dtype=torch.bool),
         torch.zeros(2, dtype=torch.int64), torch.tensor([0, 2, 6]), 0.5, 0.5, 1e-6),
        test_utils=("test_schema", "test_faketensor"),
    )


# ------------------------------------------------------------------------- trajectories
class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


def _resnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), ResidualBlock(6),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    )


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 12)
        self.layer = nn.TransformerEncoderLayer(12, 3, dim_feedforward=20, dropout=0.0,
                                                batch_first=True)
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 11)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.layer(self.embed(tokens))))


def _trajectory(make, data, backend: str, cls, channels_last: bool = False):
    torch.manual_seed(0)
    model = make()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = cls(model, lr=0.01, weight_decay=0.01, factor_interval=2, backend=backend,
              gammas=(0.2, 0.2))
    assert opt.backend == (backend if backend != "auto" else ("native" if NATIVE else "torch"))
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).flatten(0, -2), y.flatten()).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@needs_native
@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW])
@pytest.mark.parametrize("channels_last", [False, True])
def test_resnet_trajectory_auto_matches_torch_backend(cls, channels_last):
    generator = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, 7, 7, generator=generator),
             torch.randint(0, 5, (4,), generator=generator)) for _ in range(6)]
    ours = _trajectory(_resnet, data, "auto", cls, channels_last)
    want = _trajectory(_resnet, data, "torch", cls, channels_last)
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@needs_native
@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW])
def test_transformer_trajectory_auto_matches_torch_backend(cls):
    generator = torch.Generator().manual_seed(2)
    data = [(torch.randint(0, 11, (3, 5), generator=generator),
             torch.randint(0, 11, (3, 5), generator=generator)) for _ in range(6)]
    ours = _trajectory(TinyTransformer, data, "auto", cls)
    want = _trajectory(TinyTransformer, data, "torch", cls)
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_native_backend_unavailable_raises(monkeypatch):
    monkeypatch.setattr(ops, "_NATIVE_ERROR", "ImportError: no module named adafisher._C")
    with pytest.raises(ValueError, match="backend='native'.*adafisher._C"):
        AdaFisher(nn.Linear(2, 2), backend="native")
    monkeypatch.setattr(ops, "_WARNED", False)
    with pytest.warns(UserWarning, match="adafisher._C is not available"):
        assert AdaFisher(nn.Linear(2, 2)).backend == "torch"
