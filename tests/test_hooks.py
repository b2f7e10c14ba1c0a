"""Parameters matched to layers by identity, and hooks that survive real training scripts."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from adafisher import AdaFisher
from adafisher.hooks import _accumulator_below, _gradient_accumulator
from adafisher.layers import LayerKind

import definitions as ref


def train_step(model, opt, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


class Residual(nn.Module):
    """torchvision-style block: in-place ReLU after the norm, ``out += identity``."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=inplace)
        self.inplace = inplace
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.inplace:
            out += x
        else:
            out = out + x
        out = self.relu(out)
        return self.fc(out.mean((2, 3)))


def test_inplace_ops_after_layers_give_the_same_statistics_and_steps():
    torch.manual_seed(0)
    plain = Residual(inplace=False)
    inplace = Residual(inplace=True)
    inplace.load_state_dict(plain.state_dict())
    opts = [AdaFisher(m, factor_interval=1, gammas=(0.5, 0.5)) for m in (plain, inplace)]
    for _ in range(3):
        x, y = torch.randn(6, 4, 5, 5), torch.randint(0, 3, (6,))
        for model, opt in zip((plain, inplace), opts):
            train_step(model, opt, x.clone(), y)
    for name in opts[0].tracked_layers:
        for a, b in zip(opts[0].factors(name), opts[1].factors(name)):
            torch.testing.assert_close(a, b)
    for p, q in zip(plain.parameters(), inplace.parameters()):
        torch.testing.assert_close(p, q)


def test_statistics_from_hooks_equal_definitions():
    """The hooks feed the layer's real input and output gradient into the pending buffer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 3))
    opt = AdaFisher(model)
    captured = {}

    def capture(module, args, out):  # before the in-place ReLU changes `out`
        captured["x"] = args[0]
        out.register_hook(lambda g: captured.update(g=g))

    model[0].register_forward_hook(capture)
    x = torch.randn(11, 5)
    model(x).square().sum().backward()
    buffers = next(iter(opt._buffers.values()))
    slot = buffers.slots[0]
    h = buffers.pending[slot.h_offset : slot.h_offset + slot.h_len]
    s = buffers.pending[slot.s_offset : slot.s_offset + slot.s_len]
    torch.testing.assert_close(h.double(), ref.linear_h(x, True))
    torch.testing.assert_close(s.double(), ref.linear_s(captured["g"]))
    assert buffers.pending_count[slot.index] == 1


def test_frozen_unused_and_outside_parameters():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen = nn.Linear(4, 4)
            self.used = nn.Linear(4, 2)
            self.unused = nn.Linear(4, 2)  # its forward never runs
            self.scale = nn.Parameter(torch.ones(2))  # in no layer: F = 1
            self.frozen.requires_grad_(False)

        def forward(self, x):
            return self.used(self.frozen(x)) * self.scale

    model = Net()
    opt = AdaFisher(model, factor_interval=1)
    assert opt.tracked_layers == ["used", "unused"]
    frozen_before = copy.deepcopy(model.frozen.state_dict())
    unused_before = copy.deepcopy(model.unused.state_dict())
    scale_before = model.scale.detach().clone()
    train_step(model, opt, torch.randn(8, 4), torch.randint(0, 2, (8,)))
    for k, v in frozen_before.items():
        assert torch.equal(model.frozen.state_dict()[k], v)
    for k, v in unused_before.items():
        assert torch.equal(model.unused.state_dict()[k], v)
    H, S = opt.factors("unused")
    assert torch.equal(H, torch.ones_like(H)) and torch.equal(S, torch.ones_like(S))
    # F = 1 on the first step: p − lr·m/(1−β) = p − lr·g
    torch.testing.assert_close(model.scale, scale_before - 1e-3 * model.scale.grad)


def test_shared_parameters_and_shared_layers():
    torch.manual_seed(0)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 6)
            self.block = nn.Linear(6, 6)
            self.decoder = nn.Linear(6, 10, bias=False)
            self.decoder.weight = self.embed.weight  # tied: Embedding is no tracked layer

        def forward(self, tokens):
            h = self.block(torch.relu(self.block(self.embed(tokens))))  # block used twice
            return self.decoder(h)

    model = Tied()
    opt = AdaFisher(model, factor_interval=1)
    assert opt.tracked_layers == ["block", "decoder"]
    assert opt._factor_index[id(model.embed.weight)][0].rows == 10
    tokens = torch.randint(0, 10, (4, 5))
    opt.zero_grad()
    logits = model(tokens)
    nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    buffers = next(iter(opt._buffers.values()))
    assert buffers.pending_count.tolist() == [2.0, 1.0]  # two passes through `block`
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_multihead_attention_out_proj_is_tracked_in_proj_is_not():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    opt = AdaFisher(mha)
    assert opt.tracked_layers == ["out_proj"]
    assert id(mha.in_proj_weight) not in opt._factor_index


def test_no_statistics_without_grad_or_between_intervals():
    model = nn.Linear(3, 2)
    opt = AdaFisher(model, factor_interval=2)
    buffers = next(iter(opt._buffers.values()))
    with torch.no_grad():
        model(torch.randn(4, 3))
    model(torch.randn(4, 3)).sum()  # forward with grad, but no backward: commits nothing
    assert buffers.pending_count.sum() == 0 and buffers.pending.count_nonzero() == 0
    model(torch.randn(4, 3)).sum().backward()
    assert buffers.pending_count.sum() == 1
    opt.step()  # step 0 blends
    opt.zero_grad()
    model(torch.randn(4, 3)).sum().backward()  # before step 1: 1 % 2 != 0, no statistics
    assert buffers.pending_count.sum() == 0


def test_add_param_group_tracks_a_newly_unfrozen_layer():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model[2].requires_grad_(False)
    opt = AdaFisher(model, factor_interval=1)
    assert opt.tracked_layers == ["0"]
    model[2].requires_grad_(True)
    opt.add_param_group({"params": model[2].parameters(), "lr": 1e-4})
    assert opt.tracked_layers == ["0", "2"]
    train_step(model, opt, torch.randn(5, 3), torch.randint(0, 2, (5,)))
    H, S = opt.factors("2")
    assert not torch.equal(S, torch.ones_like(S))


def test_remove_hooks_and_no_reference_cycle():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    opt = AdaFisher(model)
    assert len(model[0]._forward_hooks) == 1
    opt.remove_hooks()
    assert len(model[0]._forward_hooks) == 0

    gc.disable()
    try:
        opt = AdaFisher(model)
        opt_ref = weakref.ref(opt)
        del opt
        assert opt_ref() is None  # freed by reference counting alone: no cycle
        assert len(model[0]._forward_hooks) == 0  # and its hooks went with it
        opt = AdaFisher(model)
        model_ref = weakref.ref(model)
        del model
        assert model_ref() is None  # the optimizer does not keep the model alive
        del opt
    finally:
        gc.enable()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_parameters_use_fp32_math(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    low = copy.deepcopy(model).to(dtype)
    full = copy.deepcopy(low).float()  # same starting values
    opts = [AdaFisher(m, factor_interval=1, lr=1e-2) for m in (low, full)]
    x, y = torch.randn(9, 6), torch.randint(0, 3, (9,))
    for m, opt in zip((low, full), opts):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x.to(next(m.parameters()).dtype)).float(), y).backward()
    for p, q in zip(low.parameters(), full.parameters()):
        q.grad = p.grad.float()  # the same gradient and statistics: only the update differs
    pending = [next(iter(opt._buffers.values())).pending for opt in opts]
    pending[1].copy_(pending[0])
    for opt in opts:
        opt.step()
    for p, q in zip(low.parameters(), full.parameters()):
        assert p.dtype == dtype and opts[0].state[p]["exp_avg"].dtype == dtype
        torch.testing.assert_close(p.float(), q.to(dtype).float(), rtol=0, atol=0)


def test_float64_parameters_stay_float64():
    model = nn.Linear(4, 2).double()
    opt = AdaFisher(model, factor_interval=1)
    model(torch.randn(3, 4, dtype=torch.float64)).sum().backward()
    opt.step()
    assert model.weight.dtype == torch.float64
    assert opt.state[model.weight]["exp_avg"].dtype == torch.float64


def test_model_moved_after_the_optimizer_gives_a_clear_error():
    model = nn.Linear(3, 2)
    opt = AdaFisher(model)
    model.to(torch.device("meta"))
    with pytest.raises(RuntimeError, match="create the optimizer after moving the model"):
        model(torch.randn(2, 3, device="meta"))
    del opt


def _norm_case(case: str) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    if case.startswith("batchnorm"):
        norm = nn.BatchNorm2d(3)
        if case == "batchnorm-eval":
            norm.eval()
        if case == "batchnorm-frozen-bias":
            norm.bias.requires_grad_(False)
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), norm, nn.ReLU(inplace=True))
        return model, norm, (5, 2, 4, 6)
    norm = nn.LayerNorm((4, 6), bias=case != "layernorm-no-bias")
    return nn.Sequential(nn.Linear(6, 6), norm, nn.Tanh()), norm, (5, 4, 6)


@pytest.mark.parametrize(
    "case",
    ["batchnorm", "batchnorm-eval", "batchnorm-frozen-bias", "layernorm", "layernorm-no-bias"],
)
def test_norm_statistics_from_autograd_or_tensors_equal_definitions(case, monkeypatch):
    """Norm layers read Σx and Σg from what autograd computed where it can (training-mode
    BatchNorm's saved mean, the bias gradient) and from the tensors otherwise: both routes
    give the SPEC's statistics."""
    torch.manual_seed(0)
    model, norm, shape = _norm_case(case)
    opt = AdaFisher(model)
    captured = {}

    def capture(module, args, out):
        captured["x"] = args[0].detach().clone()
        out.register_hook(lambda g: captured.update(g=g))

    norm.register_forward_hook(capture)
    # Ĥ from x itself goes through the backend's input_statistic (whichever backend auto chose)
    calls = []
    original = opt._backend.input_statistic
    monkeypatch.setattr(opt._backend, "input_statistic",
                        lambda kind, *a: (kind is LayerKind.BATCHNORM and calls.append(kind))
                        or original(kind, *a))
    model(torch.randn(shape) * 2 + 0.5).square().sum().backward()

    buffers = next(iter(opt._buffers.values()))
    slot = buffers.slots[1]
    h = buffers.pending[slot.h_offset : slot.h_offset + slot.h_len].double()
    s = buffers.pending[slot.s_offset : slot.s_offset + slot.s_len].double()
    x, g = captured["x"], captured["g"]
    if case.startswith("batchnorm"):
        expected_h, expected_s = ref.batchnorm_h(x), ref.batchnorm_s(g, shape[0])
        assert bool(calls) == (case == "batchnorm-eval")  # only eval mode reads x again
    else:
        expected_h, expected_s = ref.layernorm_h(x), ref.layernorm_s(g, 2, shape[0])
    torch.testing.assert_close(h, expected_h, rtol=1e-5, atol=0)
    torch.testing.assert_close(s, expected_s, rtol=1e-5, atol=0)
    assert buffers.pending_count[slot.index] == 1


def test_torch_compile_gives_the_eager_statistics_and_steps():
    """Under torch.compile the hooks' checks are traced and the statistics run eagerly: the
    same factors and parameters as an eager twin (aot_eager: dynamo + AOTAutograd, no C++)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # graphs compiled by earlier tests must not count
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 8), nn.LayerNorm(8), nn.Linear(8, 3),
    )
    twin = copy.deepcopy(model)
    hp = dict(factor_interval=2, gammas=(0.5, 0.5))
    opt, twin_opt = AdaFisher(model, **hp), AdaFisher(twin, **hp)
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(4):
        x, y = torch.randn(5, 3, 6, 6), torch.randint(0, 3, (5,))
        train_step(compiled, opt, x, y)
        train_step(twin, twin_opt, x, y)
    for name in opt.tracked_layers:
        for a, b in zip(opt.factors(name), twin_opt.factors(name)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # no retracing of the statistics per layer: a handful of graphs, not one per layer kind
    # (16 when they were traced; 5 here: with and without statistics, forward pieces)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 8
    torch._dynamo.reset()


def _weight_norm_linear() -> nn.Module:
    layer = nn.Linear(3, 4)
    return nn.utils.parametrizations.weight_norm(layer)  # weight is computed: not a leaf


@pytest.mark.parametrize(
    "make, x_shape, autocast",
    [
        (lambda: nn.Conv2d(2, 3, 3, padding=1), (2, 2, 5, 5), False),
        (lambda: nn.Conv2d(2, 3, 3, bias=False), (2, 2, 5, 5), False),
        (lambda: nn.Conv2d(2, 3, 3), (2, 2, 5, 5), True),  # weight cast: ToCopy in between
        (lambda: nn.Linear(3, 4), (2, 5, 3), False),  # 3-D input: View → Addmm → T
        (lambda: nn.Linear(3, 4, bias=False), (5, 3), False),
        (lambda: nn.Linear(3, 4), (5, 3), True),
        (lambda: nn.BatchNorm2d(3), (4, 3, 2, 2), False),
        (lambda: nn.LayerNorm(3), (4, 3), False),
    ],
)
def test_gradient_accumulator_found_below_the_output_is_the_parameters(make, x_shape, autocast):
    """The accumulator found by walking a few edges below the layer's output is the one
    ``get_gradient_edge`` returns (what decides whether a backward pass commits)."""
    torch.manual_seed(0)
    module = make()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = module(torch.randn(x_shape))
        found = _gradient_accumulator(module, out.grad_fn)
        expected = get_gradient_edge(module.weight).node
    assert found is expected


def test_parametrized_weights_are_skipped_for_their_bias():
    """A weight computed on access (weight_norm) has no accumulator of its own, and asking
    ``get_gradient_edge`` builds a node outside the graph (the layer then never committed):
    the bias's accumulator stands in, or None (unknown: commit)."""
    layer = _weight_norm_linear()
    out = layer(torch.randn(5, 3))
    assert _gradient_accumulator(layer, out.grad_fn) is get_gradient_edge(layer.bias).node
    layer.bias.requires_grad_(False)
    assert _gradient_accumulator(layer, layer(torch.randn(5, 3)).grad_fn) is None


def test_parametrized_weight_layers_receive_statistics():
    """A weight-normed Linear is tracked through its bias; it used to receive no statistics."""
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)),
                          nn.Tanh(), nn.Linear(4, 2))
    opt = AdaFisher(model, factor_interval=1)
    assert opt.tracked_layers == ["0", "2"]
    model(torch.randn(5, 3)).pow(2).sum().backward()
    (buffers,) = opt._buffers.values()
    assert buffers.pending_count.tolist() == [1.0, 1.0]


def test_gradient_accumulator_of_a_bias_only_layer_and_of_a_frozen_one():
    layer = nn.Linear(3, 4)
    layer.weight.requires_grad_(False)
    out = layer(torch.randn(5, 3))
    assert _gradient_accumulator(layer, out.grad_fn) is get_gradient_edge(layer.bias).node
    layer.bias.requires_grad_(False)
    assert _gradient_accumulator(layer, layer(torch.randn(5, 3)).grad_fn) is None


def test_gradient_accumulator_search_stops_on_wide_graphs():
    """A layer whose output sits above many branches: the bounded walk gives up and the
    lookup falls back to ``get_gradient_edge`` (same node)."""
    layer = nn.Linear(3, 3)
    x = torch.randn(2, 3, requires_grad=True)
    branches = [x * i for i in range(40)]
    out = torch.cat([layer(torch.stack(branches).sum(0))] + branches)
    assert _accumulator_below(out.grad_fn, layer.weight) is None
    assert _gradient_accumulator(layer, out.grad_fn) is get_gradient_edge(layer.weight).node
