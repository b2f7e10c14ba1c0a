"""AdaFisher with DistributedDataParallel, launched by torchrun.

    torchrun --nproc_per_node=2 examples/ddp_torchrun.py --steps 20

Each rank trains on its own slice of the data; DDP averages the gradients and AdaFisher
averages its layer statistics with one all-reduce per factor update (every
``--factor-interval`` steps). Uses NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from adafisher import AdaFisherW


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32, help="per-rank batch size")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--factor-interval", type=int, default=10)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 8 * 8, args.width), nn.ReLU(), nn.Linear(args.width, 10),
    ).to(device)
    ddp = DistributedDataParallel(model)
    # the optimizer hooks the layers of the wrapped model, like any other
    opt = AdaFisherW(ddp, lr=1e-3, weight_decay=1e-2, factor_interval=args.factor_interval)

    data = torch.Generator().manual_seed(1 + rank)  # each rank its own samples
    for step in range(args.steps):
        x = torch.randn(args.batch, 3, 8, 8, generator=data).to(device)
        y = (x.mean(dim=(1, 2, 3)) > 0).long()
        loss = nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step} loss {loss.item():.4f}", flush=True)

    if rank == 0:
        print(f"done: {world} ranks, tracked layers {opt.tracked_layers}", flush=True)
    del ddp, opt  # before the process group goes
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
