"""The main job: epoch time and accuracy of AdaFisher against Adam on a small CNN.

Trains the same small CNN on scikit-learn's bundled handwritten digits (1,797 real 8x8 images,
no download; fixed stratified 75/25 split) with each optimizer, from the same initial weights,
in the same batch order, their epochs interleaved round-robin (so that load from other
processes hits all of them alike). Prints a table (median epoch time, ratio to Adam's, final
train loss, test accuracy) and writes ``epoch_time.json`` and ``epoch_time.png`` (train loss
and test accuracy against wall-clock training time, as in the paper's plots) into ``--out``.

    python bench/epoch_time.py                      # all optimizers, under a minute on 2 CPU cores
    python bench/epoch_time.py --optimizers adam,adafisher --epochs 5 --out /tmp/r
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    from bench import common
except ImportError:  # run as `python bench/epoch_time.py`: bench/ itself is on sys.path
    import common

# AdaFisher with default gammas is close to momentum SGD with step lr/damping (SPEC section 3);
# its lr was chosen on this task from {1e-4, 3e-4, 1e-3} (bench/README.md).
ADAFISHER_LR = 3e-4
ADAM_LR = 1e-3
DECOUPLED_WD = 1e-2  # torch.optim.AdamW's default, used for both decoupled-decay optimizers


@dataclass(frozen=True)
class Spec:
    """How to build one named optimizer of the comparison."""

    family: str  # adam | adamw | AdaFisher | AdaFisherW
    factor_interval: int | None = None  # AdaFisher only; None = the package default (100)
    weight_decay: float = 0.0

    def describe(self, lr: float) -> str:
        text = f"{self.family} lr={lr:g}"
        if self.weight_decay:
            text += f" wd={self.weight_decay:g}"
        if self.family.startswith("AdaFisher"):
            text += f" factor_interval={self.factor_interval or 100}"
        return text


# the order here is the order of the table
OPTIMIZERS: dict[str, Spec] = {
    "adam": Spec("Adam"),
    "adamw": Spec("AdamW", weight_decay=DECOUPLED_WD),
    "adafisher-i1": Spec("AdaFisher", factor_interval=1),
    "adafisher": Spec("AdaFisher"),
    "adafisherw": Spec("AdaFisherW", weight_decay=DECOUPLED_WD),
    "adafisherw-i1": Spec("AdaFisherW", factor_interval=1, weight_decay=DECOUPLED_WD),
}


def make_optimizer(spec: Spec, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if spec.family in ("Adam", "AdamW"):
        cls = getattr(torch.optim, spec.family)
        return cls(model.parameters(), lr=lr, weight_decay=spec.weight_decay)
    cls = getattr(common.import_adafisher(), spec.family)  # lazy: Adam runs need no package
    extra = {"factor_interval": spec.factor_interval} if spec.factor_interval else {}
    return cls(model, lr=lr, weight_decay=spec.weight_decay, **extra)


def learning_rate(spec: Spec, args: argparse.Namespace) -> float:
    return args.adafisher_lr if spec.family.startswith("AdaFisher") else args.adam_lr


DEFAULT_OPTIMIZERS = ("adam", "adamw", "adafisher-i1", "adafisher", "adafisherw")


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(device: torch.device) -> Data:
    """The bundled digits, scaled to [0, 1], as (N, 1, 8, 8) tensors already on `device`."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    # a fixed split (random_state=0), independent of --seed, so runs stay comparable
    idx_train, idx_test = train_test_split(
        range(len(y)), test_size=0.25, random_state=0, stratify=bunch.target
    )
    tr, te = torch.tensor(idx_train), torch.tensor(idx_test)
    return Data(x[tr].to(device), y[tr].to(device), x[te].to(device), y[te].to(device))


def make_model() -> nn.Module:
    """Conv/BatchNorm/Linear: every layer type AdaFisher tracks in a CNN."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Conv2d(64, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    correct = (model(x).argmax(dim=1) == y).sum().item()
    model.train(was_training)
    return correct / len(y)


def train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: Data,
    batch_size: int,
    generator: torch.Generator,
) -> list[float]:
    """One pass over the shuffled training set; returns the per-step losses."""
    loss_fn = nn.CrossEntropyLoss()
    order = torch.randperm(len(data.y_train), generator=generator).to(data.x_train.device)
    losses = []
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(data.x_train[batch]), data.y_train[batch])
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses).tolist()  # one device sync per epoch, not per step


def warm_up(data: Data, batch_size: int, device: torch.device) -> None:
    """A few untimed steps on a throwaway model, so that process-wide one-off costs (thread
    pools, oneDNN/cuDNN kernel selection, the allocator) are not charged to whichever
    optimizer happens to run first."""
    model = make_model().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    last = len(data.y_train) % batch_size  # the epoch's short last batch has its own shape
    for size in [batch_size] * 3 + ([last] if last else []):
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.x_train[:size]), data.y_train[:size]).backward()
        opt.step()
    accuracy(model, data.x_test, data.y_test)
    common.synchronize(device)


@dataclass
class Run:
    """One optimizer's training, advanced an epoch at a time.

    Why epochs of all optimizers are interleaved: on a shared machine, load from other
    processes then hits every optimizer alike instead of whichever ran at that moment.
    """

    name: str
    spec: Spec
    lr: float
    model: nn.Module
    opt: torch.optim.Optimizer
    generator: torch.Generator
    epoch_times: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    step_losses: list[list[float]] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)

    @classmethod
    def start(cls, name: str, args: argparse.Namespace, device: torch.device) -> Run:
        torch.manual_seed(args.seed)  # the same initial weights for every optimizer
        model = make_model().to(device)
        spec = OPTIMIZERS[name]
        lr = learning_rate(spec, args)
        generator = torch.Generator().manual_seed(args.seed)  # the same batch order
        return cls(name, spec, lr, model, make_optimizer(spec, model, lr), generator)

    def epoch(self, data: Data, batch_size: int, device: torch.device) -> None:
        start = common.now(device)
        losses = train_epoch(self.model, self.opt, data, batch_size, self.generator)
        self.epoch_times.append(common.now(device) - start)
        # evaluation below is not training time
        self.wall.append(sum(self.epoch_times))
        self.step_losses.append(losses)
        self.epoch_losses.append(sum(losses) / len(losses))
        self.test_acc.append(accuracy(self.model, data.x_test, data.y_test))

    def result(self) -> dict[str, Any]:
        if hasattr(self.opt, "remove_hooks"):
            self.opt.remove_hooks()
        # why: the first epoch pays one-off costs (allocator, kernel selection, lazy init)
        timed = self.epoch_times[1:] or self.epoch_times
        return {
            "description": self.spec.describe(self.lr),
            "lr": self.lr,
            "epoch_times_s": self.epoch_times,
            "first_epoch_s": self.epoch_times[0],
            "median_epoch_s": common.median(timed),
            "wall_clock_s": self.wall,
            "train_loss": self.epoch_losses,
            "step_losses": self.step_losses,
            "test_accuracy": self.test_acc,
            "final_train_loss": self.epoch_losses[-1],
            "final_test_accuracy": self.test_acc[-1],
        }


def train_all(args: argparse.Namespace, data: Data, device: torch.device) -> dict[str, Any]:
    """Every optimizer from the same start, epochs interleaved round-robin."""
    runs = [Run.start(name, args, device) for name in args.optimizers]
    total = args.epochs * len(runs)
    with common.progress(total, "training", "epoch", args.no_progress) as bar:
        for _ in range(args.epochs):
            for run in runs:
                run.epoch(data, args.batch_size, device)
                bar.set_postfix(opt=run.name, loss=f"{run.epoch_losses[-1]:.3f}",
                                acc=f"{run.test_acc[-1]:.3f}", refresh=False)
                bar.update(1)
    return {run.name: run.result() for run in runs}


def summary_rows(results: dict[str, dict[str, Any]]) -> list[list[Any]]:
    adam = results.get("adam", {}).get("median_epoch_s")
    rows = []
    for name, r in results.items():
        rel = common.ratio(r["median_epoch_s"], adam)
        rows.append(
            [
                name,
                f"{r['median_epoch_s'] * 1000:.1f}",
                f"{rel:.2f}x" if rel is not None else "-",
                f"{r['final_train_loss']:.4f}",
                f"{100 * r['final_test_accuracy']:.2f}",
            ]
        )
    return rows


TABLE_HEADERS = ("optimizer", "median epoch ms", "vs adam", "final train loss", "test acc %")


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on CI or GPU machines
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        ax_loss.plot(r["wall_clock_s"], r["train_loss"], marker=".", label=name)
        acc = [100 * a for a in r["test_accuracy"]]
        ax_acc.plot(r["wall_clock_s"], acc, marker=".", label=name)
    ax_loss.set(xlabel="training wall-clock time (s)", ylabel="train loss (epoch mean)")
    ax_loss.set_yscale("log")
    ax_acc.set(xlabel="training wall-clock time (s)", ylabel="test accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Small CNN on scikit-learn digits")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def optimizer_list(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown optimizer(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(OPTIMIZERS)}"
        )
    return list(dict.fromkeys(names))  # drop repeats, keep order


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda[:N]")
    p.add_argument("--epochs", type=common.positive_int, default=20)
    p.add_argument("--batch-size", type=common.positive_int, default=64)
    p.add_argument(
        "--optimizers",
        type=optimizer_list,
        default=list(DEFAULT_OPTIMIZERS),
        help=f"comma list from: {', '.join(OPTIMIZERS)} (default: {','.join(DEFAULT_OPTIMIZERS)})",
    )
    p.add_argument("--out", type=Path, default=Path("results"), help="output folder")
    p.add_argument("--seed", type=common.nonnegative_int, default=0)
    p.add_argument("--adam-lr", type=common.positive_float, default=ADAM_LR,
                   help="learning rate of adam and adamw (default %(default)g)")
    p.add_argument("--adafisher-lr", type=common.positive_float, default=ADAFISHER_LR,
                   help="learning rate of the adafisher variants (default %(default)g)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, torch.device]:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = common.device_or_error(parser, args.device)
    if any(n.startswith("adafisher") for n in args.optimizers):
        try:
            common.import_adafisher()
        except ImportError as exc:
            parser.error(f"{exc}; run from the repository root or `pip install -e .`")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a folder")
    return args, device


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, device = parse_args(argv)
    data = load_digits(device)
    warm_up(data, args.batch_size, device)
    started = time.perf_counter()
    results = train_all(args, data, device)
    adam = results.get("adam", {}).get("median_epoch_s")
    for r in results.values():
        r["ratio_to_adam"] = common.ratio(r["median_epoch_s"], adam)
    payload = {
        "task": "small CNN on sklearn digits (1347 train / 450 test, 8x8)",
        "config": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "optimizers": args.optimizers,
            "adam_lr": args.adam_lr,
            "adafisher_lr": args.adafisher_lr,
            "median_epoch_excludes_first": args.epochs > 1,
            "epochs_interleaved": True,
        },
        "env": common.env_info(device),
        "total_run_s": time.perf_counter() - started,
        "results": results,
    }
    common.write_json(args.out / "epoch_time.json", payload)
    try:
        plot(results, args.out / "epoch_time.png")
    except ImportError as exc:  # matplotlib is optional: the JSON holds the same numbers
        print(f"warning: no plot ({exc})", file=sys.stderr)
    table = common.format_table(TABLE_HEADERS, summary_rows(results))
    note = " (first epoch excluded as warm-up)" if args.epochs > 1 else ""
    print(f"\n{args.epochs} epochs, batch {args.batch_size}, {device}, "
          f"{torch.get_num_threads()} threads; median epoch time{note}\n{table}")
    print(f"\nwrote {args.out / 'epoch_time.json'} and {args.out / 'epoch_time.png'}")
    return payload


if __name__ == "__main__":
    main()
