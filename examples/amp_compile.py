"""Mixed precision and torch.compile with AdaFisher.

- ``torch.autocast`` runs the model in bf16 (or fp16 on CUDA with ``--dtype float16``);
  AdaFisher's statistics are float32 sums whatever the activation dtype.
- ``GradScaler`` (fp16 only) skips steps with inf/NaN gradients; a skipped step blends no
  curvature. ``optimizer.zero_grad()`` discards the statistics of a skipped step.
- ``torch.compile``: build the optimizer on the model, then compile the model; the statistics
  hooks run eagerly, outside the compiled graph, on the steps that take statistics.

    python examples/amp_compile.py                       # CPU, bf16 autocast, compiled
    python examples/amp_compile.py --device cuda --dtype float16
    python examples/amp_compile.py --no-compile
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from adafisher import AdaFisherW


def make_model(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.LayerNorm(width), nn.GELU(),
                         nn.Linear(width, width), nn.GELU(), nn.Linear(width, 10))


def main(argv: list[str] | None = None) -> list[float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (the tests use aot_eager: no C++ compiler)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if dtype is torch.float16 and device.type != "cuda":
        p.error("float16 autocast needs --device cuda; use bfloat16 on CPU")

    torch.manual_seed(0)
    model = make_model(args.width).to(device)
    optimizer = AdaFisherW(model, lr=1e-4, weight_decay=1e-2, factor_interval=10)
    compiled = model if args.no_compile else torch.compile(model, backend=args.compile_backend)
    # a scaler only for fp16: bf16 has float32's range
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)

    g = torch.Generator(device="cpu").manual_seed(0)
    teacher = torch.randn(64, 10, generator=g).to(device)
    losses = []
    for _ in range(args.steps):
        x = torch.randn(args.batch_size, 64, generator=g).to(device)
        y = (x @ teacher).argmax(1)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype):
            loss = nn.functional.cross_entropy(compiled(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # skipped, blending nothing, when the gradients hold inf/NaN
        scaler.update()
        losses.append(loss.item())
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {args.steps} steps "
          f"({args.dtype} autocast, {'eager' if args.no_compile else 'compiled'}, {device})")
    return losses


if __name__ == "__main__":
    main()
