"""Bytes AdaFisher communicates per step under data parallelism (DDP or FSDP2), measured.

    python bench/comm.py                      # two gloo ranks on CPU, FSDP2, ~30 s
    python bench/comm.py --steps 9 --factor-interval 3 --json /tmp/comm.json

Part 1 runs a small model under FSDP2 on two gloo ranks and records every collective that
AdaFisher issues (by wrapping the ``torch.distributed`` it calls), step by step: zero bytes on
steps that take no statistics, one all-reduce per factor update. Part 2 builds a 350M-parameter
GPT-style model on the meta device (no memory, no data) and reports the size of that one
all-reduce against the fp32 gradients FSDP reduce-scatters every step.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ensure_repo_on_path, format_table, positive_int, write_json  # noqa: E402

ensure_repo_on_path()


class GPTBlock(nn.Module):
    """The layers of a GPT-2 block (attention written with Linear layers, as nanoGPT does)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn_qkv = nn.Linear(width, 3 * width)
        self.attn_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp_fc = nn.Linear(width, 4 * width)
        self.mlp_proj = nn.Linear(4 * width, width)


def gpt(width: int = 1024, depth: int = 24, vocab: int = 50257, context: int = 1024) -> nn.Module:
    """GPT-2 medium's shapes (~355M parameters), the LM head tied to the token embedding."""
    model = nn.ModuleDict({
        "wte": nn.Embedding(vocab, width),
        "wpe": nn.Embedding(context, width),
        "blocks": nn.ModuleList(GPTBlock(width) for _ in range(depth)),
        "ln_f": nn.LayerNorm(width),
        "lm_head": nn.Linear(width, vocab, bias=False),
    })
    model.lm_head.weight = model.wte.weight
    return model


def statistics_all_reduce_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of AdaFisher's one all-reduce per factor update, tracked layers)."""
    from adafisher import AdaFisher  # noqa: PLC0415

    opt = AdaFisher(model)
    floats = sum(b.pending.numel() + b.pending_count.numel() for b in opt._buffers.values())
    return 4 * floats, len(opt.tracked_layers)


def gpt_figures() -> list[dict]:
    rows = []
    for head in ("tracked (tied to wte)", "untracked"):
        with torch.device("meta"):
            model = gpt()
        if head == "untracked":  # e.g. an LM head applied functionally: no Linear module
            del model["lm_head"]
        params = sum(p.numel() for p in model.parameters())
        allreduce, layers = statistics_all_reduce_bytes(model)
        rows.append({"lm_head": head, "parameters": params, "tracked_layers": layers,
                     "statistics_all_reduce_bytes": allreduce, "fp32_gradient_bytes": 4 * params})
    return rows


# ------------------------------------------------------------------- measured, on two ranks
def _counting(real: types.ModuleType, log: list[int]) -> types.SimpleNamespace:
    """``torch.distributed`` with collectives that record their payload in ``log``."""
    names = [k for k in dir(real) if not k.startswith("__")]
    proxy = types.SimpleNamespace(**{k: getattr(real, k) for k in names})
    for name in ("all_reduce", "all_gather", "broadcast", "reduce_scatter",
                 "all_gather_into_tensor", "reduce_scatter_tensor"):
        collective = getattr(real, name)

        def counted(tensor, *args, _collective=collective, **kwargs):
            log.append(tensor.numel() * tensor.element_size())
            return _collective(tensor, *args, **kwargs)

        setattr(proxy, name, counted)
    return proxy


def _rank(rank: int, world: int, init_file: str, steps: int, interval: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    from adafisher import AdaFisher  # noqa: PLC0415
    from adafisher import distributed as adafisher_distributed  # noqa: PLC0415

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        log: list[int] = []
        adafisher_distributed.dist = _counting(dist, log)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 10))
        for layer in (model[0], model[3]):
            fully_shard(layer)
        fully_shard(model)
        opt = AdaFisher(model, factor_interval=interval)
        per_step = []
        for _ in range(steps):
            x = torch.randn(16, 32)
            opt.zero_grad()
            model(x).square().mean().backward()
            log.clear()
            opt.step()  # only AdaFisher's collectives: FSDP's happen in forward/backward
            per_step.append(list(log))
        sizes = sum(b.pending.numel() + b.pending_count.numel() for b in opt._buffers.values())
        if rank == 0:
            torch.save({"per_step": per_step, "expected_bytes": 4 * sizes}, out)
        del model, opt
        dist.barrier()
    finally:
        dist.destroy_process_group()


def measured_steps(steps: int, interval: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "steps.pt")
        mp.spawn(_rank, args=(2, os.path.join(tmp, "init"), steps, interval, out), nprocs=2)
        return torch.load(out, weights_only=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive_int, default=6)
    parser.add_argument("--factor-interval", type=positive_int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)

    measured = measured_steps(args.steps, args.factor_interval)
    print(f"AdaFisher's collectives per optimizer step (FSDP2, 2 gloo ranks, "
          f"factor_interval={args.factor_interval}):")
    print(format_table(
        ["step", "takes statistics", "collectives", "bytes"],
        [(k, k % args.factor_interval == 0, len(log), sum(log))
         for k, log in enumerate(measured["per_step"])],
    ))
    print(f"(flat pending buffer + pass counts: {measured['expected_bytes']} bytes)\n")
    rows = gpt_figures()
    print("GPT-2-medium-shaped model (meta device): one statistics all-reduce per factor update")
    print(format_table(
        ["LM head", "parameters", "tracked layers", "all-reduce (MB)", "fp32 grads (GB)",
         "ratio"],
        [(r["lm_head"], r["parameters"], r["tracked_layers"],
          r["statistics_all_reduce_bytes"] / 1e6, r["fp32_gradient_bytes"] / 1e9,
          r["statistics_all_reduce_bytes"] / r["fp32_gradient_bytes"]) for r in rows],
    ))
    if args.json:
        write_json(args.json, {"per_step_bytes": [sum(s) for s in measured["per_step"]],
                               "per_step_collectives": [len(s) for s in measured["per_step"]],
                               "gpt": rows})


if __name__ == "__main__":
    main()
