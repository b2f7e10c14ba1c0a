"""What a step and a statistics pass mean: attention's out_proj, input-only gradient passes,
hyperparameter validation at step(), float64 factors, foreign parameters, cyclic schedulers,
maximize, atomic and gradient-free steps."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from test_trajectory import SmallNet, batches
from torch import nn

import adafisher
from adafisher import AdaFisher, AdaFisherW

import definitions as ref
from reference_optimizer import ReferenceAdaFisher


def _buffers(opt):
    return list(opt._buffers.values())


def _statistics_step(model, opt, x, loss_fn=lambda out: out.float().pow(2).mean()):
    opt.zero_grad()
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    loss_fn(out).backward()
    opt.step()


# --------------------------------------------------------------- tracked means fed (issue 9.1)
class GPTBlock(nn.Module):
    def __init__(self, d=8, heads=2):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        n = x.shape[1]
        causal = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ResNetBlock(nn.Module):
    """torchvision BasicBlock layout (in-place ReLU, ``out += identity``, downsample path)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.down = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.relu(self.bn0(self.stem(x)))
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.down(x)
        out = self.relu(out)
        return self.fc(out.mean((2, 3)))


class Attention(nn.Module):
    def __init__(self, batch_first, need_weights):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.need_weights = need_weights

    def forward(self, x):
        return self.attn(x, x, x, need_weights=self.need_weights)[0]


MODELS = {
    "encoder_batch_first": (lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0,
                                                               batch_first=True),
                            (3, 5, 8)),
    "encoder_seq_first": (lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), (5, 3, 8)),
    "encoder_norm_first": (lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0,
                                                              batch_first=True, norm_first=True),
                           (3, 5, 8)),
    "mha_batch_first_weights": (lambda: Attention(True, True), (3, 5, 8)),
    "mha_batch_first_no_weights": (lambda: Attention(True, False), (3, 5, 8)),
    "mha_seq_first_weights": (lambda: Attention(False, True), (5, 3, 8)),
    "mha_seq_first_no_weights": (lambda: Attention(False, False), (5, 3, 8)),
    "gpt_block": (GPTBlock, (3, 5, 8)),
    "resnet_block": (ResNetBlock, (2, 3, 8, 8)),
}


@pytest.mark.parametrize("name", MODELS)
def test_every_tracked_layer_is_blended_after_one_statistics_step(name):
    torch.manual_seed(0)
    build, shape = MODELS[name]
    model = build()
    opt = AdaFisher(model, factor_interval=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no "received no statistics" warning
        _statistics_step(model, opt, torch.randn(shape))
    blended = {slot.name: bool(b.initialized()[slot.index]) for b in _buffers(opt)
               for slot in b.slots}
    assert blended == {layer: True for layer in opt.tracked_layers}
    if "mha" in name or "encoder" in name or "gpt" in name:
        assert any(layer.endswith("out_proj") for layer in opt.tracked_layers)


def _attention_output_before_projection(mha, x, batch_first):
    """Multi-head attention written out: the out-projection's input, (rows, embed)."""
    if not batch_first:
        x = x.transpose(0, 1)
    n, length, e = x.shape
    heads, d = mha.num_heads, e // mha.num_heads
    q, k, v = nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)

    def split(t):
        return t.reshape(n, length, heads, d).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d)
    attended = scores.softmax(-1) @ split(v)  # (n, heads, length, d)
    return attended.transpose(1, 2).reshape(n * length, e)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_out_proj_statistics_equal_the_definition(batch_first, need_weights, backend):
    """SPEC §2: Ĥ = mean over rows of x² (+1 for the bias) with x the attention output before
    the projection, Ŝ = mean over rows of g² with g the gradient of the attention's output.
    gammas (1, 1) make the factors the normalized fresh statistics; float64 throughout."""
    torch.manual_seed(3)
    model = Attention(batch_first, need_weights).double()
    opt = AdaFisher(model, factor_interval=1, gammas=(1.0, 1.0), backend=backend)
    x = torch.randn((3, 5, 8) if batch_first else (5, 3, 8), dtype=torch.float64)
    with torch.no_grad():  # before the step changes the weights
        inputs = _attention_output_before_projection(model.attn, x, batch_first)
    out = model(x)
    out.retain_grad()
    (out.sin() * torch.arange(8, dtype=torch.float64)).sum().backward()
    opt.step()
    h = ref.blend(torch.zeros(9, dtype=torch.float64), ref.linear_h(inputs, True), (1.0, 1.0))
    s = ref.blend(torch.zeros(8, dtype=torch.float64), ref.linear_s(out.grad.reshape(-1, 8)),
                  (1.0, 1.0))
    H, S = opt.factors("attn.out_proj")
    assert H.dtype == S.dtype == torch.float64
    torch.testing.assert_close(H, h, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(S, s, rtol=1e-10, atol=1e-12)


class FunctionalHead(nn.Module):
    """Applies a Linear's weight functionally (as MultiheadAttention does its out_proj)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return nn.functional.linear(self.body(x), self.head.weight, self.head.bias)


def test_a_tracked_layer_that_gets_no_statistics_is_named_once():
    model = FunctionalHead()
    opt = AdaFisher(model, factor_interval=1)
    with pytest.warns(RuntimeWarning, match="'head'.*no curvature statistics"):
        _statistics_step(model, opt, torch.randn(6, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _statistics_step(model, opt, torch.randn(6, 4))  # once per layer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_unfed_layer_warning_on_cuda_comes_from_an_asynchronous_copy():
    """On CUDA the pass counts reach the host by a non-blocking copy into pinned memory, read
    by a later step once its event has completed: the layer is still named, once."""
    model = FunctionalHead().cuda()
    opt = AdaFisher(model, factor_interval=1, backend="torch")
    with pytest.warns(RuntimeWarning, match="'head'.*no curvature statistics"):
        for _ in range(5):
            _statistics_step(model, opt, torch.randn(6, 4, device="cuda"))
            torch.cuda.synchronize()  # the copy has landed: the next step reports it
    assert opt._unfed_check.warned == {"head"}


# ------------------------------------------------- input-only gradient passes (issue 9.2)
@pytest.mark.parametrize("backend", ["torch", "triton", "native"])
@pytest.mark.parametrize("probe", ["autograd_grad", "backward_inputs"])
def test_input_gradient_passes_commit_no_statistics(backend, probe):
    """An FGSM / saliency pass before the training backward adds nothing: the factors equal a
    run without it, trained on the same adversarial batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(12, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    twin = copy.deepcopy(model)
    opt = AdaFisher(model, factor_interval=1, gammas=(0.5, 0.5), backend=backend)
    twin_opt = AdaFisher(twin, factor_interval=1, gammas=(0.5, 0.5), backend=backend)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(4, 2, 4, 4, generator=gen, requires_grad=True)
        y = torch.randint(0, 3, (4,), generator=gen)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if probe == "autograd_grad":
            (saliency,) = torch.autograd.grad(loss, x)
        else:
            loss.backward(inputs=[x])
            saliency = x.grad
        assert all(b.pending_count.sum() == 0 for b in _buffers(opt))
        x_adv = (x + 0.1 * saliency.sign()).detach()
        nn.functional.cross_entropy(model(x_adv), y).backward()
        opt.step()
        twin_opt.zero_grad()
        nn.functional.cross_entropy(twin(x_adv), y).backward()
        twin_opt.step()
    for name in opt.tracked_layers:
        for ours, theirs in zip(opt.factors(name), twin_opt.factors(name)):
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_backward_with_some_layers_as_inputs_commits_only_those():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = AdaFisher(model, factor_interval=1)
    model(torch.randn(5, 3)).pow(2).sum().backward(inputs=list(model[2].parameters()))
    assert _buffers(opt)[0].pending_count.tolist() == [0.0, 1.0]


# ------------------------------------------------------------- validation (issue 9.3, 12.1)
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(damping=0.0), r"damping must be in \(0.0, inf\]"),
        (dict(damping=math.inf), "damping must be finite"),
        (dict(lr=math.inf), "lr must be finite"),
        (dict(weight_decay=math.inf), "weight_decay must be finite"),
        (dict(lr=math.nan), "lr must be finite"),
    ],
)
def test_constructor_refuses_nonfinite_and_zero_damping(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaFisher(nn.Linear(2, 2), **kwargs)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("beta", 1.0, r"beta must be in \[0.0, 1.0\)"),
        ("damping", 0.0, "damping"),
        ("lr", math.inf, "lr must be finite"),
        ("weight_decay", -1.0, "weight_decay"),
        ("maximize", "yes", "maximize must be a bool"),
    ],
)
def test_group_values_changed_after_construction_are_checked_at_step(key, value, match):
    model = nn.Linear(3, 2)
    opt = AdaFisher(model, factor_interval=1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0][key] = value
    model(torch.randn(4, 3)).sum().backward()
    error = TypeError if key == "maximize" else ValueError
    with pytest.raises(error, match=match):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("key", ["foreach", "fused", "capturable", "differentiable"])
def test_unsupported_torch_group_options_are_refused(key):
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=f"{key}=True is not supported"):
        AdaFisher(model, [{"params": model.parameters(), key: True}], backend="torch")
    # the no-op value is fine
    AdaFisher(model, [{"params": model.parameters(), key: False}], backend="torch")


@pytest.mark.parametrize("backend", [
    pytest.param("native", marks=pytest.mark.skipif(not adafisher.native_available(),
                                                    reason="adafisher._C not built")),
    "triton",
])
def test_capturable_is_accepted_by_the_planned_backends(backend):
    """Native and Triton step through the cached plan: step counts and lr live on the
    parameters' device, so a CUDA graph replays with current values."""
    model = nn.Linear(3, 2)
    opt = AdaFisher(model, [{"params": model.parameters(), "capturable": True}],
                    backend=backend)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert opt.param_groups[0]["capturable"] is True
    assert all(isinstance(opt.state[p]["step"], torch.Tensor) for p in model.parameters())


# ------------------------------------------------------------------- float64 (issue 9.4)
def test_float64_layers_get_float64_factors_and_follow_the_float64_reference():
    """30 steps in a sensitive setting (EMA gammas, statistics every step): the float64
    trajectory matches the literal float64 SPEC implementation to float64 rounding."""
    torch.manual_seed(1)
    model = SmallNet().double()
    twin = copy.deepcopy(model)
    hp = dict(lr=3e-3, beta=0.9, damping=1e-3, gammas=(0.05, 0.05), factor_interval=1,
              weight_decay=0.05)
    opt = AdaFisherW(model, **hp)
    reference = ReferenceAdaFisher(twin, decoupled=True, **hp)
    for x, y in batches(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        twin.zero_grad()
        nn.functional.cross_entropy(twin(x), y).backward()
        reference.after_backward()
        reference.step()
    for name in opt.tracked_layers:
        H, S = opt.factors(name)
        assert H.dtype == S.dtype == torch.float64
        torch.testing.assert_close(H, reference.H[name], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(S, reference.S[name], rtol=1e-10, atol=1e-13)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_default_dtype_float64_does_not_change_the_step(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    twin = copy.deepcopy(model)
    x = torch.randn(5, 4)
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        opt = AdaFisher(model, factor_interval=1, backend=backend)
        for _ in range(2):
            _statistics_step(model, opt, x)
    finally:
        torch.set_default_dtype(previous)
    twin_opt = AdaFisher(twin, factor_interval=1, backend=backend)
    for _ in range(2):
        _statistics_step(twin, twin_opt, x)
    assert all(b.factors.dtype == torch.float32 for b in _buffers(opt))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float64_and_float32_layers_on_one_device(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    model[2].double()

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net[2](self.net[1](self.net[0](x)).double())

    mixed = Mixed()
    opt = AdaFisher(mixed, factor_interval=1, backend=backend)
    assert sorted(str(b.dtype) for b in _buffers(opt)) == ["torch.float32", "torch.float64"]
    for _ in range(2):
        _statistics_step(mixed, opt, torch.randn(5, 4))
    assert opt.factors("net.0")[0].dtype == torch.float32
    assert opt.factors("net.2")[0].dtype == torch.float64
    assert all(b.initialized().all() for b in _buffers(opt))
    assert all(torch.isfinite(p).all() for p in mixed.parameters())


# ---------------------------------------------------------- foreign parameters (issue 9.10)
def test_parameters_of_another_model_only_are_refused():
    model_a, model_b = nn.Linear(3, 2), nn.Linear(3, 2)
    with pytest.raises(ValueError, match="none of the given parameters belongs to the model"):
        AdaFisher(model_a, model_b.parameters())
    temperature = nn.Parameter(torch.ones(()))
    opt = AdaFisher(model_a, [*model_a.parameters(), temperature])  # alongside: fine, F = 1
    assert opt.tracked_layers == [""]


# -------------------------------------------------------------- schedulers (issue 9.11)
@pytest.mark.parametrize("scheduler", ["OneCycleLR", "CyclicLR"])
def test_cyclic_schedulers_with_their_defaults_cycle_beta(scheduler):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = AdaFisher(model, factor_interval=2)
    if scheduler == "OneCycleLR":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=12)
    else:
        sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=1e-4, max_lr=1e-3, step_size_up=3)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    betas, losses = [], []
    for i in range(10):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        momentum = opt.param_groups[0]["momentum"]
        opt.step()
        assert opt.param_groups[0]["beta"] == momentum  # the step used the cycled value
        betas.append(momentum)
        losses.append(loss.item())
        if i < 9:
            sched.step()
    assert len(set(betas)) > 3 and all(0.8 <= b <= 0.95 for b in betas)
    assert losses[-1] < losses[0]
    # setting beta directly (no scheduler step since) still works, and the alias follows it
    opt.param_groups[0]["beta"] = 0.5
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    assert opt.param_groups[0]["momentum"] == 0.5


def test_beta_and_momentum_set_to_different_values_at_once_are_refused():
    model = nn.Linear(3, 2)
    opt = AdaFisher(model)
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=5)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    opt.param_groups[0]["beta"] = 0.5
    opt.param_groups[0]["momentum"] = 0.6
    with pytest.raises(ValueError, match="'beta' and its alias 'momentum'"):
        opt.step()


# ---------------------------------------------------------------- maximize (issue 12.1)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("where", ["keyword", "group"])
@pytest.mark.parametrize("decoupled", [False, True], ids=["AdaFisher", "AdaFisherW"])
def test_maximize_equals_minimizing_the_negated_loss(backend, where, decoupled):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    twin = copy.deepcopy(model)
    cls = AdaFisherW if decoupled else AdaFisher
    hp = dict(factor_interval=1, weight_decay=0.1, lr=1e-2, backend=backend)
    if where == "keyword":
        opt = cls(model, maximize=True, **hp)
    else:
        opt = cls(model, [{"params": model.parameters(), "maximize": True}], **hp)
    twin_opt = cls(twin, **hp)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(5, 4, generator=gen)
        _statistics_step(model, opt, x, lambda out: -out.pow(2).mean())
        _statistics_step(twin, twin_opt, x, lambda out: out.pow(2).mean())
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert opt.param_groups[0]["maximize"] is True


# ------------------------------------------------------- atomic and gradient-free (12.2, 12.6)
def test_a_refused_step_changes_nothing():
    model = nn.Sequential(nn.Linear(3, 3), nn.Embedding(5, 3, sparse=True))
    opt = AdaFisher(model, factor_interval=1)

    def backward():
        opt.zero_grad()
        (model[0](torch.randn(2, 3)).sum() + model[1](torch.tensor([1, 2])).sum()).backward()

    backward()
    model[1].weight.grad = None
    opt.step()  # one good step first: state exists
    snapshot = copy.deepcopy((opt.state_dict(), [p.detach().clone() for p in model.parameters()]))
    backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    state, params = snapshot
    after = opt.state_dict()
    assert after["state"][0]["step"] == state["state"][0]["step"] == 1
    assert after["adafisher"]["factor_step"] == state["adafisher"]["factor_step"]
    for name, layer in state["adafisher"]["layers"].items():
        torch.testing.assert_close(after["adafisher"]["layers"][name]["H"], layer["H"])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


def test_a_step_without_gradients_does_not_advance_the_statistics_schedule():
    model = nn.Linear(3, 2)
    opt = AdaFisher(model, factor_interval=2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
    assert opt.state_dict()["adafisher"]["factor_step"] == 3
    opt.zero_grad()
    opt.step()
    assert opt.state_dict()["adafisher"]["factor_step"] == 3
    assert opt.state_dict()["state"][0]["step"] == 3


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_gives_the_plain_statistics(reentrant):
    """Recomputed forwards (reentrant: inside the backward) still count once per pass."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 4))
    head = nn.Linear(4, 2)
    model = nn.ModuleDict({"block": block, "head": head})
    twin = copy.deepcopy(model)
    opt = AdaFisher(model, factor_interval=1, gammas=(0.5, 0.5))
    twin_opt = AdaFisher(twin, factor_interval=1, gammas=(0.5, 0.5))
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(5, 4, generator=gen, requires_grad=True)
        opt.zero_grad()
        hidden = checkpoint(model["block"], x, use_reentrant=reentrant)
        model["head"](hidden).pow(2).mean().backward()
        assert _buffers(opt)[0].pending_count.tolist() == [1.0, 1.0, 1.0, 1.0]
        opt.step()
        twin_opt.zero_grad()
        twin["head"](twin["block"](x)).pow(2).mean().backward()
        twin_opt.step()
    for name in opt.tracked_layers:
        for ours, theirs in zip(opt.factors(name), twin_opt.factors(name)):
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


# ------------------------------------------------- the per-group path (FSDP2 shards' step)
class MixedDtypeNet(nn.Module):
    """fp32 and float64 layers: two factor buffers on one device."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.b = nn.Linear(5, 4).double()
        self.c = nn.Linear(4, 2)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)).double())).float())


@pytest.mark.parametrize("backend", [
    pytest.param("native", marks=pytest.mark.skipif(not adafisher.native_available(),
                                                    reason="adafisher._C not built")),
    "triton",
])
def test_per_group_path_steps_two_factor_buffers_of_one_device(backend):
    """The path FSDP2 shards take (one fused call per device and factor buffer) on a model
    with fp32 and float64 layers follows the torch backend (native used to refuse it)."""
    torch.manual_seed(0)
    model = MixedDtypeNet()
    twin = copy.deepcopy(model)
    opt = AdaFisher(model, factor_interval=2, backend=backend)
    assert opt._plan is not None
    opt._plan = None  # as with sharded parameters
    expected = AdaFisher(twin, factor_interval=2, backend="torch")
    assert len(_buffers(opt)) == 2
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(6, 3, generator=gen)
        for m, o in ((model, opt), (twin, expected)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
