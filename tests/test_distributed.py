"""Data-parallel training (SPEC §7): two gloo ranks on CPU, each with half of every batch,
follow the single-process full-batch trajectory."""

from __future__ import annotations

import faulthandler
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from adafisher import AdaFisher

WORLD = 2
STEPS = 6


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # Linear and Conv only: their statistics are batch means, so ranks average exactly
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
    )


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 2, 5, 5, generator=g), torch.randn(8, 3, generator=g))
            for _ in range(STEPS)]


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # a summed loss scaled up keeps the squared-gradient statistics far above min-max's 1e-6
    # (and a tiny lr keeps the steps, ~lr·g/F, moderate)
    return 1e3 * (out - target).square().sum()


def train(model, opt, data, rank: int = 0, world: int = 1) -> None:
    for x, y in data:
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        opt.zero_grad()
        loss_fn(model(x[shard]), y[shard]).backward()
        opt.step()


def train_rank(rank: int) -> list[torch.Tensor]:
    model = make_model()
    # DDP averages gradients; a summed loss over half batches then needs ×WORLD to match
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = AdaFisher(ddp, lr=1e-8, factor_interval=2, gammas=(0.2, 0.2))
    for x, y in batches():
        shard = slice(rank * 4, rank * 4 + 4)
        opt.zero_grad()
        (WORLD * loss_fn(ddp(x[shard]), y[shard])).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def run_rank(rank: int, init_file: str, out_file: str) -> None:
    # a hung collective must fail the test, not stall the suite
    faulthandler.dump_traceback_later(120, exit=True)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        # DDP and the optimizer are gone when train_rank returns: destroying the process group
        # under a live DDP hung its destructor now and then
        params = train_rank(rank)
        if rank == 0:
            torch.save(params, out_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_two_ranks_follow_the_single_process_trajectory(tmp_path, monkeypatch):
    # for the spawned ranks only: monkeypatch restores the variable for later tests
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    out_file = str(tmp_path / "params.pt")
    mp.spawn(run_rank, args=(str(tmp_path / "init"), out_file), nprocs=WORLD, join=True)
    distributed = torch.load(out_file, weights_only=True)

    model = make_model()
    opt = AdaFisher(model, lr=1e-8, factor_interval=2, gammas=(0.2, 0.2))
    train(model, opt, batches())
    for p, q in zip(model.parameters(), distributed):
        torch.testing.assert_close(q, p.detach(), rtol=1e-5, atol=1e-6 * p.abs().max().item())
