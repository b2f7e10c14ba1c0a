"""Statistics and factor-update cost: the fused kernels against the torch reference.

- Conv Ĥ (im2col-free) on every distinct ResNet-50 conv input at batch 256 (224×224 images),
  NCHW and channels_last: time, achieved GB/s on the one read of the activation, and that as %
  of a measured device-to-device copy (target on an H200: ≥ 60% over the network).
- Conv Ŝ on the matching output gradients; Linear Ĥ/Ŝ and LayerNorm statistics on a
  transformer's (tokens × width) activations; BatchNorm statistics.
- Normalize + blend (one launch) over ResNet-50's and the transformer's whole factor buffer.

    python bench/factors.py --out results              # GPU when present
    python bench/factors.py --cpu-dry-run --out /tmp/r    # tiny sizes on CPU, torch backend
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

try:
    from bench import common
    from bench import step as step_bench
except ImportError:  # run as `python bench/factors.py`: bench/ itself is on sys.path
    import common
    import step as step_bench

# (C_in, H, kernel, stride, padding, C_out) → how many of ResNet-50's convs read such an input
ConvShape = tuple[int, int, int, int, int, int]


def resnet50_convs(width: int = 64, image: int = 224) -> Counter[ConvShape]:
    """ResNet-50's conv layers (torchvision v1.5: stride on the 3×3) by input geometry."""
    convs: Counter[ConvShape] = Counter()
    size = image // 2
    convs[(3, image, 7, 2, 3, width)] += 1
    size //= 2  # max pool
    inplanes = width
    for stage, blocks in enumerate((3, 4, 6, 3)):
        planes = width * 2**stage
        for b in range(blocks):
            stride = 2 if (b == 0 and stage > 0) else 1
            convs[(inplanes, size, 1, 1, 0, planes)] += 1
            convs[(planes, size, 3, stride, 1, planes)] += 1
            if b == 0:
                convs[(inplanes, size, 1, stride, 0, planes * 4)] += 1
            size = size // stride
            convs[(planes, size, 1, 1, 0, planes * 4)] += 1
            inplanes = planes * 4
    return convs


class Timer:
    def __init__(self, device: torch.device, repeats: int, copy_gbs: float) -> None:
        self.device, self.repeats, self.copy_gbs = device, repeats, copy_gbs

    def __call__(self, fn: Callable[[], Any], n_bytes: int) -> dict[str, float]:
        seconds = common.median(step_bench.device_times(fn, self.device, self.repeats, 2))
        gbs = n_bytes / seconds / 1e9
        return {"ms": seconds * 1e3, "gbs": gbs, "pct_of_copy": 100 * gbs / self.copy_gbs}


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.to(memory_format=torch.channels_last) if channels_last else x


def bench_convs(args, backends: dict[str, Any], timer: Timer) -> dict[str, Any]:
    af_layers = common.import_adafisher().layers
    kind = af_layers.LayerKind.CONV
    dims = (2, 32, 8) if args.cpu_dry_run else (args.batch, 224, 64)
    batch, image, width = dims
    rows, totals = [], {}
    for layout in args.layouts:
        for (c_in, size, k, stride, pad, c_out), count in sorted(resnet50_convs(width, image)
                                                                 .items()):
            conv = nn.Conv2d(c_in, c_out, k, stride, pad, bias=False).to(timer.device)
            x = _layout(torch.randn(batch, c_in, size, size, device=timer.device,
                                    dtype=args.dtype), layout == "channels_last")
            out = (size + 2 * pad - k) // stride + 1
            g = _layout(torch.randn(batch, c_out, out, out, device=timer.device,
                                    dtype=args.dtype), layout == "channels_last")
            row = {"layout": layout, "c_in": c_in, "size": size, "kernel": k, "stride": stride,
                   "c_out": c_out, "count": count}
            for name, backend in backends.items():
                def h_stat(b=backend, conv=conv, x=x) -> None:
                    b.input_statistic(kind, conv, x)

                def s_stat(b=backend, conv=conv, g=g) -> None:
                    _conv_s(b, conv, g)

                row[f"h_{name}"] = timer(h_stat, x.nbytes)
                row[f"s_{name}"] = timer(s_stat, g.nbytes)
            rows.append(row)
        for name in backends:
            for side in ("h", "s"):
                mine = [r for r in rows if r["layout"] == layout]
                key = "c_in" if side == "h" else "c_out"
                seconds = sum(r["count"] * r[f"{side}_{name}"]["ms"] / 1e3 for r in mine)
                moved = sum(r["count"] * r[f"{side}_{name}"]["gbs"] * r[f"{side}_{name}"]["ms"]
                            / 1e3 * 1e9 for r in mine)
                gbs = moved / seconds / 1e9
                totals[f"{layout}/{side}_{name}"] = {
                    "ms": seconds * 1e3, "gbs": gbs, "pct_of_copy": 100 * gbs / timer.copy_gbs,
                    "what": f"conv {'Ĥ' if side == 'h' else 'Ŝ'} over the network ({key} side)",
                }
    return {"batch": batch, "image": image, "layers": rows, "network": totals}


def _conv_s(backend, conv: nn.Module, g: torch.Tensor) -> None:
    """Ŝ of one backward pass committed into a one-layer pending buffer."""
    buffers, slot = _one_layer(conv, g.device)
    h = torch.zeros(slot.h_len, device=g.device)
    backend.commit_pass(buffers, slot, conv, h, g, g.shape[0])


_ONE_LAYER: dict[tuple, Any] = {}


def _one_layer(module: nn.Module, device: torch.device):
    af = common.import_adafisher()
    kind = af.layers.layer_kind(module)
    key = (id(module), device)
    if key not in _ONE_LAYER:
        buffers = af.factors.FactorBuffers(device)
        slot = buffers.add_layer("layer", kind, *af.layers.factor_sizes(kind, module))
        _ONE_LAYER[key] = (module, buffers, slot)  # keep the module alive with its key
    return _ONE_LAYER[key][1:]


def bench_dense(args, backends: dict[str, Any], timer: Timer) -> list[dict[str, Any]]:
    """Linear, LayerNorm and BatchNorm statistics on representative activations."""
    af = common.import_adafisher()
    kinds = af.layers.LayerKind
    tokens, d = (64, 32) if args.cpu_dry_run else (args.tokens, 1024)
    bn_shape = (2, 8, 8, 8) if args.cpu_dry_run else (args.batch, 256, 56, 56)
    dev, dt = timer.device, args.dtype
    cases = [
        ("linear_h", nn.Linear(d, 4 * d), kinds.LINEAR, (tokens, d), "h"),
        ("linear_s", nn.Linear(d, 4 * d), kinds.LINEAR, (tokens, 4 * d), "s"),
        ("layernorm_h", nn.LayerNorm(d), kinds.LAYERNORM, (tokens // 8, 8, d), "h"),
        ("layernorm_s", nn.LayerNorm(d), kinds.LAYERNORM, (tokens // 8, 8, d), "s"),
        ("batchnorm_h", nn.BatchNorm2d(bn_shape[1]), kinds.BATCHNORM, bn_shape, "h"),
        ("batchnorm_s", nn.BatchNorm2d(bn_shape[1]), kinds.BATCHNORM, bn_shape, "s"),
    ]
    rows = []
    for name, module, kind, shape, side in cases:
        module = module.to(dev)
        x = torch.randn(*shape, device=dev, dtype=dt)
        row: dict[str, Any] = {"case": name, "shape": list(shape), "dtype": str(dt)}
        buffers, slot = _one_layer(module, dev)
        h = torch.zeros(slot.h_len, device=dev)
        for bname, backend in backends.items():
            def fn(b=backend, m=module, k=kind, x=x, side=side, pending=(buffers, slot, h)):
                if side == "h":
                    b.input_statistic(k, m, x)
                else:
                    bufs, sl, h_hat = pending
                    b.commit_pass(bufs, sl, m, h_hat, x, x.shape[0])

            row[bname] = timer(fn, x.nbytes)
        rows.append(row)
    return rows


def bench_blend(args, backends: dict[str, Any], timer: Timer) -> list[dict[str, Any]]:
    """Normalize + blend over a whole model's flat factor buffer."""
    af = common.import_adafisher()
    rows = []
    for set_name, build in step_bench.parameter_sets(args.cpu_dry_run).items():
        model = build()
        buffers = af.factors.FactorBuffers(timer.device)
        for _, module in model.named_modules():
            kind = af.layers.layer_kind(module)
            if kind is not None:
                buffers.add_layer("l", kind, *af.layers.factor_sizes(kind, module))
        row: dict[str, Any] = {"set": set_name, "layers": len(buffers.slots),
                               "floats": buffers.total}
        for bname, backend in backends.items():
            def blend(b=backend, buffers=buffers) -> None:
                buffers.pending_count.fill_(1.0)  # a pending pass for every layer
                b.update_factors(buffers, (0.92, 0.008))
            # reads pending + factors, writes factors + pending (fp32)
            row[bname] = timer(blend, 16 * buffers.total)
        rows.append(row)
    return rows


def make_backends(args, device: torch.device) -> dict[str, Any]:
    af_backends = common.import_adafisher().backends
    names = ["torch", "triton"] if args.backend == "both" else [args.backend]
    backends = {}
    for name in names:
        try:
            backends[name] = af_backends.resolve_backend(name, {device})
        except ValueError as exc:
            if args.backend != "both":
                raise
            print(f"note: skipping backend {name!r}: {exc}", file=sys.stderr)
    return backends


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_gpu_check_options(p, "factors.json", "tiny shapes")
    p.add_argument("--backend", default="both", choices=("both", "torch", "triton"),
                   help="both: the fused kernels and the torch reference, where they run")
    p.add_argument("--dtype", type=step_bench.dtype_arg, default=None,
                   help="activation dtype: fp32, bf16 or fp16 (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--layouts", default="nchw,channels_last")
    p.add_argument("--batch", type=common.positive_int, default=256)
    p.add_argument("--tokens", type=common.positive_int, default=16384,
                   help="rows of the transformer activations (batch × sequence)")
    p.add_argument("--repeats", type=common.positive_int, default=10)
    p.add_argument("--copy-mib", type=common.positive_int, default=1024)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = (
        torch.device("cpu") if args.cpu_dry_run else common.device_or_error(parser, args.device)
    )
    if args.dtype is None:
        args.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    if any(s not in ("nchw", "channels_last") for s in args.layouts):
        print("error: --layouts takes nchw and/or channels_last", file=sys.stderr)
        return 2
    if args.cpu_dry_run:
        args.repeats, args.copy_mib = min(args.repeats, 2), 8
        torch.set_num_threads(1)
    backends = make_backends(args, device)
    copy_gbs = step_bench.copy_bandwidth(device, args.copy_mib * 2**20, args.repeats)
    timer = Timer(device, args.repeats, copy_gbs)
    with torch.no_grad():
        report = {
            "env": common.env_info(device),
            "dry_run": args.cpu_dry_run,
            "copy_gbs": copy_gbs,
            "dtype": str(args.dtype),
            "backends": list(backends),
            "target": "conv Ĥ >= 60% of copy bandwidth on ResNet-50 shapes at batch 256 (H200)",
            "conv": bench_convs(args, backends, timer),
            "dense": bench_dense(args, backends, timer),
            "blend": bench_blend(args, backends, timer),
        }
    report["rows"] = summary_rows(report, list(backends))
    path = args.json or args.out / "factors.json"
    common.write_json(path, report)
    print(f"device-to-device copy: {copy_gbs:.1f} GB/s; activations {args.dtype}")
    rows = report["rows"]
    print(common.format_table(list(rows[0]), [list(r.values()) for r in rows]))
    print(f"wrote {path}")
    return 0


def summary_rows(report: dict[str, Any], backends: list[str]) -> list[dict[str, Any]]:
    """Flat rows (bench/summarize.py renders ``rows``): network totals, then the others."""
    rows = []
    for key, v in report["conv"]["network"].items():
        layout, what = key.split("/")
        side, backend = what.split("_", 1)
        rows.append({"case": f"resnet50 conv {'H' if side == 'h' else 'S'} ({layout})",
                     "backend": backend, "ms": v["ms"], "gbs": v["gbs"],
                     "pct_of_copy": v["pct_of_copy"]})
    for r in report["dense"] + report["blend"]:
        name = r.get("case") or f"blend {r['set']}"
        for backend in backends:
            rows.append({"case": name, "backend": backend, "ms": r[backend]["ms"],
                         "gbs": r[backend]["gbs"], "pct_of_copy": r[backend]["pct_of_copy"]})
    return rows


if __name__ == "__main__":
    sys.exit(main())
