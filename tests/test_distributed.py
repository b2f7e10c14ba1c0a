"""Data-parallel training (SPEC §7): two gloo ranks on CPU, each with half of every batch,
follow the single-process full-batch trajectory."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed_helpers import spawn_ranks
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


def run_rank(rank: int, world: int, out_file: str) -> None:
    # DDP and the optimizer are gone when train_rank returns
    params = train_rank(rank)
    if rank == 0:
        torch.save(params, out_file)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_two_ranks_follow_the_single_process_trajectory(tmp_path):
    out_file = str(tmp_path / "params.pt")
    spawn_ranks(run_rank, WORLD, tmp_path, out_file)
    distributed = torch.load(out_file, weights_only=True)

    model = make_model()
    opt = AdaFisher(model, lr=1e-8, factor_interval=2, gammas=(0.2, 0.2))
    train(model, opt, batches())
    for p, q in zip(model.parameters(), distributed):
        torch.testing.assert_close(q, p.detach(), rtol=1e-5, atol=1e-6 * p.abs().max().item())
