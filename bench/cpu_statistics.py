"""The CPU statistics ops of ``adafisher._C``: the AVX2+FMA leaves against the baseline ones.

Per op and shape (the ResNet-20 layers of ``bench/train_step.py`` at batch 64), both variants
run in the same process (``adafisher._C.set_cpu_isa``), interleaved round by round with the
order swapped every round, threads pinned; hot cache (the same input every call). Reported:
microseconds per call (median) of each, and avx2/baseline as the median of the paired
per-round ratios with p10–p90.

    python bench/cpu_statistics.py                       # fp32, 2 threads, 30 rounds
    python bench/cpu_statistics.py --dtypes float32,float64,bfloat16 --out /tmp/r
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

try:
    from bench import common
except ImportError:  # run as `python bench/cpu_statistics.py`
    import common

# (N, C, H, W) of ResNet-20's three stages at batch 64: the conv inputs (3×3, padding 1) and the
# output gradients the S statistic reduces per channel.
SHAPES = [(64, 16, 32, 32), (64, 32, 16, 16), (64, 64, 8, 8)]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
VARIANTS = ("baseline", "avx2")


def _cases(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> dict[str, Callable[[], Any]]:
    ops = torch.ops.adafisher
    generator = torch.Generator().manual_seed(0)
    cases: dict[str, Callable[[], Any]] = {}
    for shape in shapes:
        x = torch.randn(shape, generator=generator).to(dtype)
        n, c = shape[:2]
        name = "x".join(map(str, shape))
        cases[f"conv_input_statistic {name}"] = (
            lambda x=x: ops.conv_input_statistic(x, [3, 3], [1, 1], [1, 1], [1, 1], [1, 1], 1,
                                                 False))
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        pending, count = torch.zeros(c + 9 * c, dtype=acc), torch.zeros(1, dtype=acc)
        h_hat = torch.zeros(9 * c, dtype=acc)
        cases[f"commit_statistics {name}"] = (
            lambda x=x, p=pending, k=count, h=h_hat, c=c, n=n: ops.commit_statistics(
                p, k, h, x, 0, c, 0, 1, 2, False, 1.0 / n))
    return cases


def _calibrate(fn: Callable[[], Any], target_s: float) -> int:
    """Calls per sample so that one sample takes about ``target_s``."""
    fn()
    start = time.perf_counter()
    calls = 0
    while time.perf_counter() - start < target_s / 4:
        fn()
        calls += 1
    return max(1, round(calls * 4 * target_s / (time.perf_counter() - start) / 4))


def _measure(fn: Callable[[], Any], set_isa: Callable[[str], str], rounds: int,
             target_s: float) -> dict[str, list[float]]:
    """Seconds per call of ``fn`` under each variant, one sample per round, order swapped."""
    set_isa("baseline")
    inner = _calibrate(fn, target_s)
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for variant in VARIANTS:  # warm-up
        set_isa(variant)
        fn()
    for r in range(rounds):
        for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            set_isa(variant)
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[variant].append((time.perf_counter() - start) / inner)
    return samples


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=common.positive_int, default=2)
    parser.add_argument("--rounds", type=common.positive_int, default=30)
    parser.add_argument("--sample-seconds", type=common.positive_float, default=0.02,
                        help="time of one sample (calls per sample calibrated to it)")
    parser.add_argument("--dtypes", default="float32",
                        help=f"comma-separated, of {', '.join(DTYPES)}")
    parser.add_argument("--batch", type=common.positive_int, default=64)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    dtypes = args.dtypes.split(",")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"--dtypes: unknown {unknown}; allowed: {', '.join(DTYPES)}")
    adafisher = common.import_adafisher()
    if not adafisher.native_available():
        parser.error(f"adafisher._C is not built ({adafisher.ops.native_unavailable_reason()})")
    from adafisher import _C  # noqa: PLC0415

    if "avx2" not in _C.cpu_isas():
        parser.error(f"this CPU or build has no AVX2 leaves (supported: {_C.cpu_isas()})")
    shapes = [(args.batch, *shape[1:]) for shape in SHAPES]
    result: dict[str, Any] = {"env": common.env_info(torch.device("cpu")), "cases": {}}
    rows = []
    previous = _C.cpu_isa()
    try:
        with common.pinned_threads(args.threads):
            for dtype_name in dtypes:
                for case, fn in _cases(shapes, DTYPES[dtype_name]).items():
                    samples = _measure(fn, _C.set_cpu_isa, args.rounds, args.sample_seconds)
                    ratio = common.paired_ratios(samples["avx2"], samples["baseline"])
                    micros = {v: common.spread(s)["median"] * 1e6 for v, s in samples.items()}
                    result["cases"][f"{case} {dtype_name}"] = {
                        "seconds": samples, "us_median": micros, "avx2_vs_baseline": ratio}
                    rows.append((f"{case} {dtype_name}", f"{micros['baseline']:.0f}",
                                 f"{micros['avx2']:.0f}", common.format_spread(ratio)))
    finally:
        _C.set_cpu_isa(previous)
    print(f"CPU statistics ops, {args.threads} threads, {args.rounds} paired rounds (hot cache)")
    print(common.format_table(["op, shape, dtype", "baseline us", "avx2 us",
                               "avx2/baseline (p10–p90)"], rows))
    common.write_json(args.out / "cpu_statistics.json", result)
    return result


if __name__ == "__main__":
    main()
