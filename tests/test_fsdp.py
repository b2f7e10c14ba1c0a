"""FSDP2 (``fully_shard``, SPEC §7) on two gloo ranks: the sharded step follows single-process
training, checkpoints through ``torch.distributed.checkpoint`` resume bitwise (2 → 2, 2 → 1,
1 → 2), and unsupported layouts are refused.

Spawning ranks is slow, so one launch runs every case and writes its results; the tests below
read them (the launch runs once per session, in a fixture).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_helpers import spawn_ranks
from torch import nn
from torch.utils._pytree import tree_map_only

from adafisher import AdaFisher, AdaFisherW

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in"),
    # DCP in the test process itself (no process group) is meant: the one-process side
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]

WORLD = 2
STEPS = 10
BATCH = 8
OPTIMIZERS = {"AdaFisher": AdaFisher, "AdaFisherW": AdaFisherW}
HYPER = dict(lr=2e-7, gammas=(0.2, 0.2), weight_decay=1e-2)
# the Triton backend (through its interpreter on CPU) runs the same fused step on local shards
CASES = [(name, interval, "torch") for name in OPTIMIZERS for interval in (1, 3)]
CASES += [("AdaFisherW", 3, "triton")]
# checkpoint: train SAVE_AT steps, save, continue RESUME_STEPS
SAVE_AT, RESUME_STEPS = 4, 4


def make_model(norms: bool = False) -> nn.Module:
    torch.manual_seed(0)
    # odd output sizes (5, 7, 3) shard unevenly over two ranks; the last layer's single row
    # leaves rank 1 an empty shard
    layers = [nn.Conv2d(2, 5, 3, padding=1)]
    layers += [nn.BatchNorm2d(5)] if norms else []
    layers += [nn.Tanh(), nn.Flatten(), nn.Linear(5 * 5 * 5, 7)]
    layers += [nn.LayerNorm(7)] if norms else []
    layers += [nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1)]
    return nn.Sequential(*layers)


def batches(steps: int = STEPS, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 2, 5, 5, generator=g), torch.randn(BATCH, 1, generator=g))
            for _ in range(steps)]


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # summed and scaled up: squared-gradient statistics far above min-max's 1e-6
    return 1e3 * (out - target).float().square().sum()


def train(model, opt, data, rank: int = 0, world: int = 1) -> None:
    """Each rank takes its slice of every batch; FSDP2 averages gradients over ranks, so the
    summed loss is scaled by the world size to give the full batch's gradient."""
    for x, y in data:
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        opt.zero_grad()
        (world * loss_fn(model(x[shard]), y[shard])).backward()
        opt.step()


def train_emulating_ranks(model, opt, data, world: int = WORLD) -> None:
    """One process, the SPEC §7 rank-averaged definition: per step, one pass per rank's slice
    (statistics averaged over the passes, gradients summed), then one step."""
    for x, y in data:
        opt.zero_grad()
        for rank in range(world):
            shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
            loss_fn(model(x[shard]), y[shard]).backward()
        opt.step()


def shard_model(model: nn.Module, **kwargs) -> nn.Module:
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    for layer in model:
        if any(p.requires_grad for p in layer.parameters()):
            fully_shard(layer, **kwargs)  # per block
    fully_shard(model, **kwargs)  # and the root
    return model


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for name, p in model.named_parameters()
    }


def full_state(model: nn.Module, opt) -> tuple[dict, dict]:
    """Model and optimizer state gathered to full tensors on CPU (collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    sharded = dist.is_initialized()
    options = StateDictOptions(full_state_dict=sharded, cpu_offload=sharded)
    state = (get_model_state_dict(model, options=options),
             get_optimizer_state_dict(model, opt, options=options))
    # copies: some entries (the step counts) are the optimizer's live tensors
    return tree_map_only(torch.Tensor, torch.clone, state)


def dcp_save(model, opt, path: Path) -> None:
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415
    from torch.distributed.checkpoint.state_dict import get_state_dict  # noqa: PLC0415

    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))


def dcp_load(model, opt, path: Path) -> None:
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415
    from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415
        get_state_dict,
        set_state_dict,
    )

    model_state, optim_state = get_state_dict(model, opt)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_full(model, opt, state: tuple[dict, dict]) -> None:
    from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=dist.is_initialized())
    set_model_state_dict(model, state[0], options=options)
    set_optimizer_state_dict(model, opt, state[1], options=options)


def checkpoint_run(sharded: bool) -> tuple:
    model = make_model()
    if sharded:
        shard_model(model)
    opt = AdaFisherW(model, factor_interval=3, **HYPER)
    return model, opt


# ------------------------------------------------------------------------------ the ranks
def rank_worker(rank: int, world: int, out: str) -> None:
    out = Path(out)
    results: dict = {}
    from torch.distributed.fsdp import MixedPrecisionPolicy  # noqa: PLC0415
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor  # noqa: PLC0415

    fallbacks = {}  # parameters the Triton backend left to the reference update
    for name, interval, backend in CASES:  # equivalence with single-process full-batch training
        model = shard_model(make_model())
        opt = OPTIMIZERS[name](model, factor_interval=interval, backend=backend, **HYPER)
        train(model, opt, batches(), rank, world)
        results[(name, interval, backend)] = full_params(model)
        results["backend", backend] = opt.backend
        fallbacks.update(opt.slow_path_parameters)
        del model, opt
    results["triton_fallbacks"] = fallbacks

    model = shard_model(make_model(norms=True))  # norms: the rank-averaged definition
    opt = AdaFisher(model, factor_interval=1, **HYPER)
    train(model, opt, batches(), rank, world)
    results["norms"] = full_params(model)

    # mixed precision: bf16 compute, fp32 gradients, statistics and sharded parameters
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = shard_model(make_model(), mp_policy=policy)
    opt = AdaFisher(model, factor_interval=1, **HYPER)
    train(model, opt, batches(3), rank, world)
    p = next(model.parameters())
    results["mixed"] = {
        "param": p.dtype, "grad": p.grad.dtype if p.grad is not None else None,
        "exp_avg": opt.state[p]["exp_avg"].dtype,
        "factors": [opt.factors(n) for n in opt.tracked_layers],
        "params": full_params(model),
    }
    del model, opt

    # HSDP: a 2-D mesh, replicated over its first dim (of size 1 here), sharded over the second
    hsdp = DeviceMesh("cpu", [list(range(world))], mesh_dim_names=("replicate", "shard"))
    model = shard_model(make_model(), mesh=hsdp)
    opt = AdaFisher(model, factor_interval=1, **HYPER)
    train(model, opt, batches(), rank, world)
    results["hsdp"] = full_params(model)
    results["hsdp_placements"] = next(model.parameters()).placements
    del model, opt

    # unsupported layouts are refused, naming the parameter: another shard dim, and tensor
    # parallelism's second sharded mesh dim
    mesh = DeviceMesh("cpu", list(range(world)))
    for case, layout_mesh, placements in (("shard1", mesh, [Shard(1)]),
                                          ("tp", hsdp, [Shard(0), Shard(0)])):
        model = make_model()
        weight = distribute_tensor(model[3].weight.detach(), layout_mesh, placements)
        model[3].weight = nn.Parameter(weight)
        try:
            AdaFisher(model)
            results[case] = None
        except ValueError as exc:
            results[case] = str(exc)

    # checkpoints: 2 ranks save, then continue (uninterrupted) or resume from DCP
    data = batches(SAVE_AT + RESUME_STEPS, seed=2)
    model, opt = checkpoint_run(sharded=True)
    train(model, opt, data[:SAVE_AT], rank, world)
    dcp_save(model, opt, out / "ckpt_2ranks")
    saved = full_state(model, opt)
    train(model, opt, data[SAVE_AT:], rank, world)
    results["uninterrupted"] = full_params(model)
    model, opt = checkpoint_run(sharded=True)
    dcp_load(model, opt, out / "ckpt_2ranks")
    results["reloaded"] = full_state(model, opt)
    train(model, opt, data[SAVE_AT:], rank, world)
    results["resumed"] = full_params(model)

    # 1 → 2: a single-process checkpoint resumed on two ranks, against the same state loaded
    # from the single process's gathered (full) state dicts
    for source, load in (("from_dcp", dcp_load), ("from_full", load_full)):
        model, opt = checkpoint_run(sharded=True)
        arg = out / "ckpt_1rank" if source == "from_dcp" else torch.load(
            out / "state_1rank.pt", weights_only=True)
        load(model, opt, arg)
        train(model, opt, data[SAVE_AT:], rank, world)
        results[source] = full_params(model)
    del model, opt
    if rank == 0:
        torch.save(saved, out / "state_2ranks.pt")
        torch.save(results, out / "results.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("fsdp")
    # the 1-rank checkpoint (1 → 2): a plain single-process run, saved with DCP
    data = batches(SAVE_AT + RESUME_STEPS, seed=2)
    model, opt = checkpoint_run(sharded=False)
    train(model, opt, data[:SAVE_AT])
    dcp_save(model, opt, out / "ckpt_1rank")
    torch.save(full_state(model, opt), out / "state_1rank.pt")
    spawn_ranks(rank_worker, WORLD, out, str(out))
    return torch.load(out / "results.pt", weights_only=False), out


def assert_trajectory_close(actual: dict, expected: nn.Module, norms: bool = False) -> None:
    """≤ 1e-5 relative to each parameter's scale; the steps move the parameters by percents,
    so a wrong factor or row offset shows."""
    initial = dict(make_model(norms).named_parameters())
    moved = max(((p - initial[n]).abs().max() / p.abs().max()).item()
                for n, p in expected.named_parameters())
    assert moved > 1e-2
    for name, p in expected.named_parameters():
        torch.testing.assert_close(actual[name], p.detach(), rtol=1e-5,
                                   atol=1e-5 * p.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(("name", "interval", "backend"), CASES)
def test_fsdp2_follows_single_process_full_batch_training(ranks, name, interval, backend):
    results = ranks[0]
    assert results["backend", backend] == backend
    if backend == "triton":  # every shard, the empty one included, went through the kernel
        assert results["triton_fallbacks"] == {}
    model = make_model()
    opt = OPTIMIZERS[name](model, factor_interval=interval, **HYPER)
    train(model, opt, batches())
    assert_trajectory_close(results[(name, interval, backend)], model)


def test_fsdp2_with_norm_layers_follows_the_rank_averaged_definition(ranks):
    # BatchNorm normalizes per rank and norm statistics square a batch sum: the reference is
    # one process running each rank's slice as its own pass (SPEC §7)
    model = make_model(norms=True)
    opt = AdaFisher(model, factor_interval=1, **HYPER)
    train_emulating_ranks(model, opt, batches())
    assert_trajectory_close(ranks[0]["norms"], model, norms=True)


def test_fsdp2_mixed_precision_steps_fp32_shards_with_fp32_statistics(ranks):
    mixed = ranks[0]["mixed"]
    assert mixed["param"] == mixed["grad"] == mixed["exp_avg"] == torch.float32
    for h, s in mixed["factors"]:
        assert h.dtype == s.dtype == torch.float32
        assert torch.isfinite(h).all() and torch.isfinite(s).all() and (h != 1).any()
    # bf16 forward: close to the fp32 trajectory, not equal to it
    model = make_model()
    opt = AdaFisher(model, factor_interval=1, **HYPER)
    train(model, opt, batches(3))
    initial = dict(make_model().named_parameters())
    for name, p in model.named_parameters():
        moved = (p - initial[name]).abs().max().item()
        torch.testing.assert_close(mixed["params"][name], p.detach(), rtol=0, atol=0.1 * moved)


def test_fsdp2_refuses_sharding_on_another_dim_naming_the_parameter(ranks):
    message = ranks[0]["shard1"]
    assert message is not None and "'3.weight'" in message and "Shard(dim=1)" in message


def test_fsdp2_refuses_a_second_sharded_mesh_dim_as_in_tensor_parallelism(ranks):
    message = ranks[0]["tp"]
    assert message is not None and "'3.weight'" in message and "tensor parallelism" in message


def test_hsdp_follows_single_process_full_batch_training(ranks):
    results = ranks[0]
    assert len(results["hsdp_placements"]) == 2  # (Replicate(), Shard(0))
    model = make_model()
    opt = AdaFisher(model, factor_interval=1, **HYPER)
    train(model, opt, batches())
    assert_trajectory_close(results["hsdp"], model)


def test_dcp_resume_on_two_ranks_is_bitwise_identical(ranks):
    results, out = ranks
    saved = torch.load(out / "state_2ranks.pt", weights_only=False)
    reloaded = results["reloaded"]
    assert_state_equal(reloaded, saved)
    for name, p in results["uninterrupted"].items():
        assert torch.equal(results["resumed"][name], p), name


def test_dcp_checkpoint_of_two_ranks_resumes_bitwise_in_one_process(ranks):
    _, out = ranks
    data = batches(SAVE_AT + RESUME_STEPS, seed=2)
    continued = []
    for load in ("dcp", "full"):
        model, opt = checkpoint_run(sharded=False)
        if load == "dcp":
            dcp_load(model, opt, out / "ckpt_2ranks")
            assert_state_equal(full_state(model, opt),
                               torch.load(out / "state_2ranks.pt", weights_only=False))
        else:
            load_full(model, opt, torch.load(out / "state_2ranks.pt", weights_only=False))
        train(model, opt, data[SAVE_AT:])
        continued.append(full_params(model))
    for name, p in continued[1].items():
        assert torch.equal(continued[0][name], p), name


def test_dcp_checkpoint_of_one_process_resumes_bitwise_on_two_ranks(ranks):
    results = ranks[0]
    for name, p in results["from_full"].items():
        assert torch.equal(results["from_dcp"][name], p), name


def assert_state_equal(actual: tuple[dict, dict], expected: tuple[dict, dict]) -> None:
    flat_a, flat_e = _flatten(actual), _flatten(expected)
    assert flat_a.keys() == flat_e.keys()
    for key, value in flat_e.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(flat_a[key], value), key
        else:
            assert flat_a[key] == value, key


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {prefix: tree}
    flat = {}
    for key, value in items:
        flat.update(_flatten(value, f"{prefix}.{key}"))
    return flat
