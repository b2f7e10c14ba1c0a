"""AdaFisher with FSDP2 (``fully_shard``), checkpointed with torch.distributed.checkpoint.

    torchrun --nproc_per_node=2 examples/fsdp2_torchrun.py --steps 20 --checkpoint /tmp/ckpt
    torchrun --nproc_per_node=1 examples/fsdp2_torchrun.py --checkpoint /tmp/ckpt --resume

Parameters are sharded on dim 0 across ranks; the layers' statistics come from the unsharded
forward/backward and are averaged across ranks (one all-reduce per factor update); each rank's
step updates its own shard, momentum included. The checkpoint can be loaded on any number of
ranks. Uses NCCL on GPUs, gloo on CPU; ``--bf16`` computes in bfloat16 (FSDP2 mixed precision)
while the sharded parameters, gradients and AdaFisher's statistics stay fp32.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from adafisher import AdaFisherW


class Block(nn.Module):
    """A pre-norm MLP block, the unit FSDP2 shards and gathers as one."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32, help="per-rank batch size")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--factor-interval", type=int, default=10)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 compute")
    parser.add_argument("--checkpoint", help="directory to save the DCP checkpoint in")
    parser.add_argument("--resume", action="store_true", help="start from --checkpoint")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, args.width), *[Block(args.width) for _ in range(args.depth)],
        nn.Linear(args.width, 10),
    ).to(device)
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if args.bf16 else None, reduce_dtype=torch.float32
    )
    for block in model[1:-1]:
        fully_shard(block, mp_policy=policy)  # per block...
    fully_shard(model, mp_policy=policy)  # ...and the root (the first and last Linear)
    # built after fully_shard: it holds the sharded parameters, as the modules do
    opt = AdaFisherW(model, lr=1e-3, weight_decay=1e-2, factor_interval=args.factor_interval)

    if args.resume:
        model_state, optim_state = get_state_dict(model, opt)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=args.checkpoint)  # reshards to this world size
        set_state_dict(model, opt, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])

    data = torch.Generator().manual_seed(1 + rank)  # each rank its own samples
    for step in range(args.steps):
        x = torch.randn(args.batch, 16, generator=data).to(device)
        y = (x[:, 0] > 0).long()
        loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step} loss {loss.item():.4f}", flush=True)

    if args.checkpoint:
        model_state, optim_state = get_state_dict(model, opt)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=args.checkpoint)
    if rank == 0:
        print(f"done: {world} ranks, tracked layers {len(opt.tracked_layers)}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
