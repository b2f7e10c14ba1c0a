"""Optimizer-step cost: AdaFisher / AdaFisherW against torch AdamW(fused=True), same run.

Parameter sets (built by hand, no torchvision): ResNet-50 (25.6M parameters: conv, BatchNorm,
Linear) and a GPT-2-medium-shaped transformer (~355M: embeddings, LayerNorm, Linear). Every
parameter gets a gradient, and AdaFisher's factors are set as after their first blend, so the
step runs the full preconditioned path (F = S[row]·H[col] + λ).

For each optimizer: device time per step (CUDA events; wall clock on CPU), wall time per step
(host included), achieved GB/s on the bytes the step must move (AdaFisher 20 B/param in fp32:
read p, g, m, write p, m; AdamW 28 B/param), that as % of a measured device-to-device copy,
the time ratio against fused AdamW, and the optimizer state's memory against AdamW's. A run
with the learning rate changing every step checks that a scheduler costs nothing extra.

    python bench/step.py --out results            # GPU when present, both parameter sets
    python bench/step.py --cpu-dry-run --out /tmp/r   # tiny sizes, CPU: exercises the script
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

try:
    from bench import common
except ImportError:  # run as `python bench/step.py`: bench/ itself is on sys.path
    import common

STEP_BYTES_PER_ELEMENT = {"adafisher": 5, "adafisherw": 5, "adamw_fused": 7}  # × element size


# ------------------------------------------------------------------------- parameter sets
def resnet50(width: int = 64, classes: int = 1000) -> nn.Module:
    """ResNet-50's parameters (torchvision layout, bottleneck expansion 4); no forward."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width)]
    inplanes = width
    for stage, blocks in enumerate((3, 4, 6, 3)):
        planes = width * 2**stage
        for b in range(blocks):
            layers += [
                nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes),
                nn.Conv2d(planes, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes),
                nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4),
            ]
            if b == 0:  # downsample branch
                layers += [nn.Conv2d(inplanes, planes * 4, 1, bias=False),
                           nn.BatchNorm2d(planes * 4)]
            inplanes = planes * 4
    layers.append(nn.Linear(inplanes, classes))
    return nn.Sequential(*layers)


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)


def transformer(d: int = 1024, layers: int = 24, vocab: int = 50257, ctx: int = 1024) -> nn.Module:
    """GPT-2-medium-shaped parameters (tied output head); no forward."""
    return nn.ModuleDict({
        "wte": nn.Embedding(vocab, d), "wpe": nn.Embedding(ctx, d),
        "blocks": nn.ModuleList(_Block(d) for _ in range(layers)), "ln_f": nn.LayerNorm(d),
    })


def parameter_sets(dry_run: bool) -> dict[str, Callable[[], nn.Module]]:
    if dry_run:
        return {"resnet50": lambda: resnet50(width=4, classes=10),
                "transformer": lambda: transformer(d=32, layers=2, vocab=100, ctx=16)}
    return {"resnet50": resnet50, "transformer": transformer}


# ---------------------------------------------------------------------------------- timing
def copy_bandwidth(device: torch.device, n_bytes: int, repeats: int) -> float:
    """GB/s of ``dst.copy_(src)`` counting the read and the write."""
    src = torch.empty(n_bytes // 4, device=device).uniform_()
    dst = torch.empty_like(src)
    times = device_times(lambda: dst.copy_(src), device, repeats, warmup=2)
    return 2 * src.nbytes / common.median(times) / 1e9


def device_times(fn: Callable[[], Any], device: torch.device, repeats: int,
                 warmup: int) -> list[float]:
    """Seconds per call, one reading per call: CUDA events on a GPU, wall clock on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return times


def wall_time(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Seconds per call over ``repeats`` back-to-back calls and one final sync (host included)."""
    begin = common.now(device)
    for _ in range(repeats):
        fn()
    return (common.now(device) - begin) / repeats


# ------------------------------------------------------------------------------- optimizers
def make_optimizer(name: str, model: nn.Module, backend: str) -> torch.optim.Optimizer:
    af = common.import_adafisher()
    if name == "adafisher":
        return af.AdaFisher(model, lr=1e-4, weight_decay=1e-4, backend=backend)
    if name == "adafisherw":
        return af.AdaFisherW(model, lr=1e-4, weight_decay=1e-2, backend=backend)
    if name == "adamw_fused":
        return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-2, fused=True)
    raise ValueError(name)


def prepare_factors(opt: torch.optim.Optimizer) -> None:
    """Factors as after a first blend, so the step takes the full F path (reaches into the
    optimizer's flat buffers: a benchmark shortcut for running forward/backward passes)."""
    for buffers in getattr(opt, "_buffers", {}).values():
        buffers.factors.uniform_(0.0, 0.01)
        buffers.blended.fill_(True)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state: per-parameter tensors plus AdaFisher's flat factor buffers."""
    total = sum(t.nbytes for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    for buffers in getattr(opt, "_buffers", {}).values():
        total += sum(t.nbytes for t in (buffers.factors, buffers.pending, buffers.pending_count,
                                        buffers.blended, buffers.nonfinite, buffers.segment_ids))
    return total


def bench_set(name: str, build: Callable[[], nn.Module], args: argparse.Namespace,
              device: torch.device, copy_gbs: float) -> dict[str, Any]:
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: 355M parameters on CPU take long
        model = build().to(dtype=args.dtype)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    element = params[0].element_size()
    results: dict[str, Any] = {}
    for opt_name in args.optimizers:
        opt = make_optimizer(opt_name, model, args.backend)
        opt.step()  # creates the state (and compiles kernels) outside the timing
        prepare_factors(opt)
        common.synchronize(device)
        times = device_times(opt.step, device, args.repeats, warmup=args.warmup)
        wall = wall_time(opt.step, device, args.repeats)
        base_lr = opt.param_groups[0]["lr"]

        def scheduled_step(opt=opt, base_lr=base_lr, counter=[0]) -> None:  # noqa: B006
            counter[0] += 1  # a new lr every step, as a scheduler would set it
            for group in opt.param_groups:
                group["lr"] = base_lr * (1 + 1e-3 * (counter[0] % 100))
            opt.step()

        wall_scheduled = wall_time(scheduled_step, device, args.repeats)
        t = common.median(times)
        moved = STEP_BYTES_PER_ELEMENT[opt_name] * element * n_params
        results[opt_name] = {
            "backend": getattr(opt, "backend", "torch"),
            "device_ms": t * 1e3,
            "wall_ms": wall * 1e3,
            "wall_ms_lr_changing_every_step": wall_scheduled * 1e3,
            "bytes_per_step": moved,
            "gbs": moved / t / 1e9,
            "pct_of_copy": 100 * moved / t / 1e9 / copy_gbs,
            "state_bytes": state_bytes(opt),
        }
        if hasattr(opt, "remove_hooks"):
            opt.remove_hooks()
        del opt
    adamw = results.get("adamw_fused")
    for r in results.values():
        r["time_vs_adamw_fused"] = common.ratio(r["device_ms"], adamw and adamw["device_ms"])
        r["wall_vs_adamw_fused"] = common.ratio(r["wall_ms"], adamw and adamw["wall_ms"])
        r["memory_vs_adamw_fused"] = common.ratio(r["state_bytes"], adamw and adamw["state_bytes"])
    return {"parameters": n_params, "tensors": len(params), "dtype": str(args.dtype),
            "optimizers": results}


TARGETS = "targets (H200, fp32): >= 80% of copy bandwidth, <= 0.8x fused AdamW, memory <= 0.55x"


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per parameter set and optimizer (bench/summarize.py renders ``rows``)."""
    rows = []
    for set_name, r in report["sets"].items():
        for opt_name, o in r["optimizers"].items():
            rows.append({
                "set": set_name, "optimizer": opt_name, "backend": o["backend"],
                "device_ms": o["device_ms"], "wall_ms": o["wall_ms"],
                "wall_ms_lr_sched": o["wall_ms_lr_changing_every_step"], "gbs": o["gbs"],
                "pct_of_copy": o["pct_of_copy"], "time_vs_adamw": o["time_vs_adamw_fused"],
                "memory_vs_adamw": o["memory_vs_adamw_fused"],
            })
    return rows


def table(report: dict[str, Any]) -> str:
    rows = report["rows"]
    return common.format_table(list(rows[0]), [list(r.values()) for r in rows]) if rows else ""


def dtype_arg(text: str) -> torch.dtype:
    choices = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if text not in choices:
        raise argparse.ArgumentTypeError(f"dtype must be one of {', '.join(choices)}")
    return choices[text]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_gpu_check_options(p, "step.json", "tiny parameter sets")
    p.add_argument("--sets", default="resnet50,transformer", help="comma list of parameter sets")
    p.add_argument("--optimizers", default="adamw_fused,adafisher,adafisherw",
                   help="comma list from: adamw_fused, adafisher, adafisherw")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "native"))
    p.add_argument("--dtype", type=dtype_arg, default=torch.float32, help="fp32, bf16 or fp16")
    p.add_argument("--repeats", type=common.positive_int, default=20)
    p.add_argument("--warmup", type=common.nonnegative_int, default=3)
    p.add_argument("--copy-mib", type=common.positive_int, default=1024,
                   help="size of the copy that measures the device's bandwidth")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = (
        torch.device("cpu") if args.cpu_dry_run else common.device_or_error(parser, args.device)
    )
    if args.cpu_dry_run:
        args.repeats, args.warmup, args.copy_mib = min(args.repeats, 3), 1, 8
        torch.set_num_threads(1)  # tiny tensors: a busy second core only adds hand-off stalls
    if device.type == "cpu":
        # Denormal momenta (zero-initialised BatchNorm biases) slow CPU kernels ~500x, which
        # would time the FPU's microcode rather than the optimizers.
        torch.set_flush_denormal(True)
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    unknown = [o for o in args.optimizers if o not in STEP_BYTES_PER_ELEMENT]
    sets = parameter_sets(args.cpu_dry_run)
    chosen = [s.strip() for s in args.sets.split(",") if s.strip()]
    if unknown or any(s not in sets for s in chosen):
        print(f"error: unknown optimizer/set in {args.optimizers} / {chosen}", file=sys.stderr)
        return 2
    copy_gbs = copy_bandwidth(device, args.copy_mib * 2**20, args.repeats)
    report: dict[str, Any] = {
        "env": common.env_info(device),
        "dry_run": args.cpu_dry_run,
        "copy_gbs": copy_gbs,
        "targets": TARGETS,
        "sets": {s: bench_set(s, sets[s], args, device, copy_gbs) for s in chosen},
    }
    report["rows"] = summary_rows(report)
    path = args.json or args.out / "step.json"
    common.write_json(path, report)
    print(f"device-to-device copy: {copy_gbs:.1f} GB/s ({TARGETS})")
    print(table(report))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
