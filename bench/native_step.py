"""The native step (``adafisher._C``) on CPU against the torch backend and torch.optim.Adam.

Three measures, each interleaved round by round (variant order rotated every round), threads
pinned; reported as the median of the paired per-round ratios with p10–p90:

1. ``linear200``: 200 × Linear(64, 64) (batch 8 for the one backward that blends the factors;
   the timed steps reuse fixed random gradients of normal magnitude), ``optimizer.step()``
   time: AdaFisher torch backend (before) and native (after) against ``Adam(fused=True)`` and
   ``Adam(foreach=True)``.
2. ``linear4096``: one Linear(4096, 4096) step, same variants against ``Adam(fused=True)``.
3. ``resnet50_host``: host time of ``step()`` for ResNet-50's 161 parameters at width 1 (the
   kernels have almost nothing to do): the torch backend (before), the native op behind the
   generic per-parameter front-end (one ``.item()`` per parameter), and the cached step plan
   (after); fused Adam for scale.

    python bench/native_step.py --out results
    python bench/native_step.py --quick --out /tmp/r    # few rounds: checks the script
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    from bench import common
    from bench.step import resnet50
except ImportError:  # run as `python bench/native_step.py`
    import common
    from step import resnet50


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    return {"median": statistics.median(ordered), "p10": at(0.1), "p90": at(0.9)}


def _interleave(variants: dict[str, Callable[[], None]], rounds: int, inner: int,
                warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, one sample per round; order rotated each round."""
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn = variants[name]
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner)
    return samples


def _report(samples: dict[str, list[float]], references: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"seconds": {n: _quantiles(v) for n, v in samples.items()}}
    for ref in references:
        out[f"ratio_vs_{ref}"] = {
            n: _quantiles([a / b for a, b in zip(v, samples[ref])])
            for n, v in samples.items() if n != ref
        }
    return out


def _optimizers(adafisher, model: nn.Module, names: list[str]) -> dict[str, Callable[[], None]]:
    """One independent copy of ``model`` per variant, with gradients (and blended factors)."""
    x = torch.randn(8, _in_features(model))
    steps = {}
    for name in names:
        m = copy.deepcopy(model)
        if name.startswith("adafisher"):
            backend = name.split("_", 1)[1]
            opt = adafisher.AdaFisher(m, factor_interval=1, backend=backend)
        elif name == "adam_fused":
            opt = torch.optim.Adam(m.parameters(), fused=True)
        else:
            opt = torch.optim.Adam(m.parameters(), foreach=True)
        m(x).square().mean().backward()
        # Gradients of normal magnitude (a 200-deep chain's vanish into denormals, which would
        # time the CPU's denormal arithmetic instead of the optimizers), the same for all.
        generator = torch.Generator().manual_seed(1)
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=generator).mul_(1e-2)
        opt.step()  # state exists, factors blended; later steps reuse the gradients
        steps[name] = opt.step
    return steps


def _in_features(model: nn.Module) -> int:
    return next(m for m in model.modules() if isinstance(m, nn.Linear)).in_features


def _resnet50_host(adafisher, rounds: int, inner: int) -> dict[str, Any]:
    """ResNet-50's 161 parameters at width 1 on CPU: the kernels have (almost) nothing to do,
    so the time is the host's (the meta device would time Python fake kernels instead)."""
    steps = {}
    model = resnet50(width=1, classes=10)
    for name in ("torch_backend", "generic_path", "step_plan", "adam_fused"):
        m = copy.deepcopy(model)
        if name == "adam_fused":
            opt = torch.optim.Adam(m.parameters(), fused=True)
        else:
            opt = adafisher.AdaFisher(m, backend="torch" if name == "torch_backend" else "native")
        for p in m.parameters():
            p.grad = torch.randn_like(p)
        if name == "generic_path":
            opt._plan = None  # the native op behind today's per-parameter front-end
        opt.step()
        steps[name] = opt.step
    n_params = sum(1 for _ in model.parameters())
    samples = _interleave(steps, rounds, inner, warmup=3)
    return {"parameters": n_params, "elements": sum(p.numel() for p in model.parameters()),
            **_report(samples, ["torch_backend"])}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=common.positive_int, default=2)
    parser.add_argument("--rounds", type=common.positive_int, default=15)
    parser.add_argument("--quick", action="store_true", help="3 rounds, small inner loops")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    adafisher = common.import_adafisher()
    if not adafisher.native_available():
        parser.error(f"adafisher._C is not built ({adafisher.ops.native_unavailable_reason()})")
    rounds = 3 if args.quick else args.rounds
    scale = 1 if args.quick else 5
    variants = ["adafisher_torch", "adafisher_native", "adam_fused", "adam_foreach"]
    result: dict[str, Any] = {"env": common.env_info(torch.device("cpu"))}

    net = nn.Sequential(*(nn.Linear(64, 64) for _ in range(200)))
    samples = _interleave(_optimizers(adafisher, net, variants), rounds, 4 * scale, warmup=2)
    result["linear200"] = _report(samples, ["adam_fused", "adam_foreach"])

    big = nn.Sequential(nn.Linear(4096, 4096))
    samples = _interleave(_optimizers(adafisher, big, variants[:3]), rounds, scale, warmup=1)
    result["linear4096"] = _report(samples, ["adam_fused"])

    result["resnet50_host"] = _resnet50_host(adafisher, rounds, 20 * scale)

    rows = []
    for measure, reference in (("linear200", "adam_fused"), ("linear200", "adam_foreach"),
                               ("linear4096", "adam_fused"),
                               ("resnet50_host", "torch_backend")):
        for name, q in result[measure][f"ratio_vs_{reference}"].items():
            seconds = result[measure]["seconds"][name]["median"]
            rows.append([measure, name, reference, q["median"], f"{q['p10']:.3g}–{q['p90']:.3g}",
                         f"{seconds * 1e3:.4g}"])
    print(common.format_table(["measure", "variant", "vs", "ratio (median)", "p10–p90",
                               "ms/step"], rows))
    common.write_json(args.out / "native_step.json", result)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
