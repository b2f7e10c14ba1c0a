"""Training-step time of AdaFisher against torch Adam, side by side in one run (CPU).

A small CIFAR-size ResNet (ResNet-20 layout), batch 64, random CIFAR-shaped data. A *round*
times one whole factor interval (``--interval`` steps, default 100 = AdaFisher's default) of
each optimizer in turn, in an order that rotates every round: the default-interval AdaFisher's
window therefore holds exactly one statistics step, as its steps do on average in training.
Each optimizer's window is divided by Adam's from the same round; the median of these paired
ratios and their p10-p90 band are printed (``!`` when the band is too wide to trust) and
written as JSON.

    python bench/train_step.py                        # 3 rounds of 100 steps: minutes on CPU
    python bench/train_step.py --interval 10 --rounds 5 --threads 2
    python bench/train_step.py --backend torch        # the pure-PyTorch reference backend
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from adafisher import AdaFisher  # noqa: E402
from adafisher.backends import BACKENDS  # noqa: E402
from bench import common  # noqa: E402

DEFAULT_THREADS = 2


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return self.relu(out)


def cifar_resnet(blocks_per_stage: int = 3, width: int = 16, classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
    ]
    c = width
    for stage, c_out in enumerate((width, 2 * width, 4 * width)):
        for b in range(blocks_per_stage):
            layers.append(BasicBlock(c, c_out, 2 if stage > 0 and b == 0 else 1))
            c = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    return nn.Sequential(*layers)


def optimizers(
    interval: int, backend: str = "auto"
) -> dict[str, Callable[[nn.Module], torch.optim.Optimizer]]:
    """The compared optimizers; ``adafisher`` takes statistics once per ``interval`` steps."""
    return {
        "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
        "adafisher-i1": lambda m: AdaFisher(m, lr=1e-3, factor_interval=1, backend=backend),
        "adafisher": lambda m: AdaFisher(m, lr=1e-3, factor_interval=interval, backend=backend),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=common.positive_int, default=DEFAULT_THREADS,
                        help="torch CPU threads, pinned for the run (default: %(default)s)")
    parser.add_argument("--batch-size", type=common.positive_int, default=64)
    parser.add_argument("--interval", type=common.positive_int, default=100,
                        help="steps per timed window = the default-interval AdaFisher's "
                             "factor_interval (default: %(default)s, the package default)")
    parser.add_argument("--rounds", type=common.positive_int, default=3,
                        help="timed windows per optimizer (default: %(default)s)")
    parser.add_argument("--warmup-rounds", type=common.nonnegative_int, default=1,
                        help="untimed windows first (default: %(default)s)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="AdaFisher's backend (default: %(default)s; the one that ran is "
                             "printed: 'auto' picks the compiled kernels on CPU when built)")
    parser.add_argument("--out", type=Path, default=Path("results"),
                        help="writes OUT/train_step.json (default: results)")
    args = parser.parse_args(argv)
    with common.pinned_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> dict:
    runs = {}
    for name, make in optimizers(args.interval, args.backend).items():
        torch.manual_seed(0)
        model = cifar_resnet()
        runs[name] = (model, make(model))
    ran = {opt.backend for _, opt in runs.values() if isinstance(opt, AdaFisher)}
    backend = ran.pop() if len(ran) == 1 else ", ".join(sorted(ran))
    x = torch.randn(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))

    def window(model: nn.Module, opt: torch.optim.Optimizer) -> float:
        """``args.interval`` consecutive steps; every optimizer's step count stays a multiple of
        the interval between windows, so each AdaFisher window holds its statistics step."""
        start = time.perf_counter()
        for _ in range(args.interval):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    with common.progress(len(names) * (args.warmup_rounds + args.rounds), "train_step",
                         "window") as bar:
        for i in range(args.warmup_rounds + args.rounds):
            # in an order rotating every round: noise (and whatever one optimizer leaves in the
            # allocator or caches) hits every optimizer alike
            for name in names[i % len(names) :] + names[: i % len(names)]:
                elapsed = window(*runs[name])
                if i >= args.warmup_rounds:
                    times[name].append(elapsed)
                bar.update(1)

    per_step = {n: common.spread([t / args.interval for t in ts]) for n, ts in times.items()}
    ratios = {n: common.paired_ratios(times[n], times["adam"]) for n in times}
    result = {
        "model": "cifar-resnet20", "batch_size": args.batch_size, "threads": args.threads,
        "interval": args.interval, "rounds": args.rounds, "torch": torch.__version__,
        "backend_requested": args.backend, "backend": backend,
        "step_s": per_step, "ratio_to_adam": ratios, "window_times_s": times,
        "untrusted": [n for n, r in ratios.items() if not r["trusted"]],
    }
    print(f"\nCIFAR ResNet-20, batch {args.batch_size}, {args.threads} thread(s); "
          f"{args.rounds} rounds of {args.interval} steps each (median, p10–p90); AdaFisher "
          f"backend: {backend} (requested {args.backend!r})")
    rows = [[n, common.format_spread(per_step[n], scale=1e3, digits=1),
             common.format_spread(ratios[n], digits=3, suffix="x")] for n in names]
    print(common.format_table(("optimizer", "step ms", "ratio to Adam, paired"), rows))
    if result["untrusted"]:
        print(f"WARNING: ratios of {', '.join(result['untrusted'])} spread more than "
              f"{common.TRUSTED_RELATIVE_SPREAD:.0%} of their median: load changed during the "
              "run; do not trust them.")
    common.write_json(args.out / "train_step.json", result)
    return result


if __name__ == "__main__":
    main()
