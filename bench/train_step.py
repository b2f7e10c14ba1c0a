"""Training-step time of AdaFisher against torch Adam, side by side in one run.

A small CIFAR-size ResNet (ResNet-20 layout), batch 64, random CIFAR-shaped data. Optimizers
are timed in interleaved rounds so that machine noise hits all of them alike; the median
step time of each and its ratio to Adam's are printed and written as JSON.

    python bench/train_step.py --threads 2 --steps 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from adafisher import AdaFisher  # noqa: E402


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


OPTIMIZERS = {
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
    "adafisher-i1": lambda m: AdaFisher(m, lr=1e-3, factor_interval=1, backend="torch"),
    "adafisher": lambda m: AdaFisher(m, lr=1e-3, backend="torch"),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    for name in ("threads", "batch_size", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    torch.set_num_threads(args.threads)

    runs = {}
    for name, make in OPTIMIZERS.items():
        torch.manual_seed(0)
        model = cifar_resnet()
        runs[name] = (model, make(model))
    x = torch.randn(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))

    def one_step(model: nn.Module, opt: torch.optim.Optimizer) -> float:
        start = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for i in range(args.warmup + args.steps):
        # interleaved, in an order rotating every round: noise (and whatever one optimizer
        # leaves in the allocator or caches) hits every optimizer alike
        for name in names[i % len(names) :] + names[: i % len(names)]:
            model, opt = runs[name]
            elapsed = one_step(model, opt)
            if i >= args.warmup:
                times[name].append(elapsed)

    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "model": "cifar-resnet20", "batch_size": args.batch_size, "threads": args.threads,
        "torch": torch.__version__, "median_step_s": medians,
        "ratio_to_adam": {n: medians[n] / medians["adam"] for n in medians},
        "step_times_s": times,
    }
    print(f"{'optimizer':<14}{'median step (ms)':>18}{'ratio to Adam':>15}")
    for name, t in medians.items():
        print(f"{name:<14}{t * 1e3:>18.1f}{result['ratio_to_adam'][name]:>15.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_step.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
