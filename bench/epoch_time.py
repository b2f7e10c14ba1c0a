"""The main job: test accuracy per wall-clock time of AdaFisher against Adam.

Tasks (``--task``):
  mnist1d  (default) MNIST-1D (Greydanus 2020): 4,000 train / 1,000 test 1-D signals of length
           40 in 10 classes, generated offline by the ``mnist1d`` package from its reference
           templates; the small 1-D CNN of that paper (3 Conv1d + Linear, Adam reaches ~94%
           after 6,000 steps there). Optimizers separate on it.
  digits   scikit-learn's bundled 8x8 digits (1,797 images, 75/25 split) with a small 2-D CNN
           (Conv/BatchNorm/Linear): a seconds-long smoke run; every optimizer ends near 99%.

Every optimizer starts from the same weights and sees the same batches. Their epochs run
interleaved, one *round* = one epoch of each (in an order that rotates every round), so that
load from other processes hits all of them alike; each is timed per round against the
reference (Adam), and the table reports the median of those paired per-round ratios with its
p10-p90 band, flagging a band too wide to trust. Several seeds give accuracy as mean +- std.
Each optimizer's learning rate is the winner of ``--lr-sweep`` (a sweep on a validation split
held out of the training set), stored below per task; the output says so.

    python bench/epoch_time.py                          # run time: bench/README.md
    python bench/epoch_time.py --task digits            # smoke run, seconds
    python bench/epoch_time.py --lr-sweep               # re-derive the stored learning rates
    python bench/epoch_time.py --optimizers adam,adafisher --seeds 1 --out /tmp/r
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    from bench import common
except ImportError:  # run as `python bench/epoch_time.py`: bench/ itself is on sys.path
    import common

DECOUPLED_WD = 1e-2  # torch.optim.AdamW's default, used for both decoupled-decay optimizers
REFERENCE = "adam"  # ratios and the accuracy target are relative to this optimizer
DEFAULT_THREADS = 1  # with one thread per process, epoch times held steady under load


@dataclass(frozen=True)
class Spec:
    """How to build one named optimizer of the comparison."""

    family: str  # Adam | AdamW | AdaFisher | AdaFisherW
    factor_interval: int | None = None  # AdaFisher only; None = the package default (100)
    weight_decay: float = 0.0

    @property
    def is_adafisher(self) -> bool:
        return self.family.startswith("AdaFisher")

    def describe(self, lr: float) -> str:
        text = f"{self.family} lr={lr:g}"
        if self.weight_decay:
            text += f" wd={self.weight_decay:g}"
        if self.is_adafisher:
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
DEFAULT_OPTIMIZERS = ("adam", "adamw", "adafisher-i1", "adafisher", "adafisherw")

# Learning rates tried by --lr-sweep. AdaFisher with default gammas is close to momentum SGD
# with step lr/damping (docs/algorithm.md, "What the defaults mean"), so its grid sits lower.
LR_GRID = {"adam": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1), "adafisher": (1e-4, 3e-4, 1e-3, 3e-3)}

# Winners of `--lr-sweep` per task (best final validation accuracy, seed 0, the task's default
# epochs and batch size; the tables are in bench/README.md). `adafisherw-i1` is not in the
# default list and was not swept: it uses adafisherw's winner. Re-derive them with
# `python bench/epoch_time.py --lr-sweep [--task T] [--optimizers ...]`.
SWEPT_LR: dict[str, dict[str, float]] = {
    "mnist1d": {"adam": 3e-2, "adamw": 3e-2, "adafisher-i1": 1e-3, "adafisher": 1e-3,
                "adafisherw": 1e-3, "adafisherw-i1": 1e-3},
    "digits": {"adam": 3e-3, "adamw": 3e-3, "adafisher-i1": 1e-4, "adafisher": 1e-4,
               "adafisherw": 1e-4, "adafisherw-i1": 1e-4},
}


def make_optimizer(spec: Spec, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if not spec.is_adafisher:
        cls = getattr(torch.optim, spec.family)
        return cls(model.parameters(), lr=lr, weight_decay=spec.weight_decay)
    cls = getattr(common.import_adafisher(), spec.family)  # lazy: Adam runs need no package
    extra = {"factor_interval": spec.factor_interval} if spec.factor_interval else {}
    return cls(model, lr=lr, weight_decay=spec.weight_decay, **extra)


# ------------------------------------------------------------------------------------ tasks
@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def validation_split(self, fraction: float = 0.2) -> Data:
        """Train on the first (1 - fraction) of the training set, evaluate on the rest (the
        test set is not looked at). The training sets are already in random order."""
        cut = int(len(self.y_train) * (1 - fraction))
        return Data(self.x_train[:cut], self.y_train[:cut], self.x_train[cut:],
                    self.y_train[cut:])


def load_mnist1d(device: torch.device) -> Data:
    """MNIST-1D with the package's reference settings (seed 42): generated, not downloaded."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise ImportError(
            f"the mnist1d task needs the `mnist1d` package ({exc}): `pip install mnist1d` "
            "(or the bench extra, `pip install -e '.[bench]'`), or use --task digits"
        ) from exc
    d = make_dataset(get_dataset_args())  # ~2 s on CPU; deterministic

    def tensors(x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(x, dtype=torch.float32).unsqueeze(1).to(device),
                torch.tensor(y, dtype=torch.long).to(device))

    return Data(*tensors(d["x"], d["y"]), *tensors(d["x_test"], d["y_test"]))


def mnist1d_model() -> nn.Module:
    """The CNN of the MNIST-1D paper (its `ConvBase`): 40 -> 19 -> 10 -> 5 positions."""
    return nn.Sequential(
        nn.Conv1d(1, 25, 5, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(25, 25, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(25, 25, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(25 * 5, 10),
    )


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


def digits_model() -> nn.Module:
    """Conv/BatchNorm/Linear: every layer type AdaFisher tracks in a CNN."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
    )


@dataclass(frozen=True)
class Task:
    description: str
    load: Callable[[torch.device], Data]
    make_model: Callable[[], nn.Module]
    epochs: int
    seeds: int
    batch_size: int


TASKS = {
    "mnist1d": Task("MNIST-1D (4000 train / 1000 test, length 40), its paper's 1-D CNN",
                    load_mnist1d, mnist1d_model, epochs=30, seeds=3, batch_size=100),
    "digits": Task("sklearn digits (1347 train / 450 test, 8x8), small 2-D CNN",
                   load_digits, digits_model, epochs=8, seeds=2, batch_size=64),
}


# --------------------------------------------------------------------------------- training
@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    correct = (model(x).argmax(dim=1) == y).sum().item()
    model.train(was_training)
    return correct / len(y)


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, data: Data, batch_size: int,
                generator: torch.Generator) -> list[float]:
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


def warm_up(task: Task, data: Data, batch_size: int, device: torch.device) -> None:
    """A few untimed steps on a throwaway model, so that process-wide one-off costs (thread
    pools, oneDNN/cuDNN kernel selection, the allocator) are not charged to whichever
    optimizer happens to run first."""
    model = task.make_model().to(device)
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
    """One optimizer's training from one seed, advanced an epoch at a time."""

    name: str
    lr: float
    model: nn.Module
    opt: torch.optim.Optimizer
    generator: torch.Generator
    epoch_times: list[float] = field(default_factory=list)
    step_losses: list[list[float]] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)

    @classmethod
    def start(cls, name: str, lr: float, task: Task, seed: int, device: torch.device) -> Run:
        torch.manual_seed(seed)  # the same initial weights for every optimizer
        model = task.make_model().to(device)
        generator = torch.Generator().manual_seed(seed)  # the same batch order
        return cls(name, lr, model, make_optimizer(OPTIMIZERS[name], model, lr), generator)

    def epoch(self, data: Data, batch_size: int, device: torch.device) -> None:
        start = common.now(device)
        losses = train_epoch(self.model, self.opt, data, batch_size, self.generator)
        self.epoch_times.append(common.now(device) - start)
        # evaluation below is not training time
        self.step_losses.append(losses)
        self.train_loss.append(sum(losses) / len(losses))
        self.test_acc.append(accuracy(self.model, data.x_test, data.y_test))

    def close(self) -> None:
        if hasattr(self.opt, "remove_hooks"):
            self.opt.remove_hooks()


def train_seed(names: Sequence[str], lrs: dict[str, float], task: Task, data: Data, seed: int,
               epochs: int, batch_size: int, device: torch.device,
               on_round: Callable[[list[Run]], None] = lambda runs: None) -> list[Run]:
    """Every optimizer from the same start; one round = one epoch of each, in an order that
    rotates every round (whatever one leaves in caches or the allocator hits all alike)."""
    runs = [Run.start(name, lrs[name], task, seed, device) for name in names]
    for epoch in range(epochs):
        shift = epoch % len(runs)
        for run in runs[shift:] + runs[:shift]:
            run.epoch(data, batch_size, device)
        on_round(runs)
    for run in runs:
        run.close()
    return runs


# ---------------------------------------------------------------------------------- results
def mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    return [statistics.fmean(values) for values in zip(*curves)]


def std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(names: Sequence[str], seeds: list[list[Run]], lrs: dict[str, float],
              reference: str) -> dict[str, dict[str, Any]]:
    """Per optimizer: epoch time and paired ratio (each seed's first epoch left out as
    warm-up), accuracy mean ± std over seeds, and time to reach the reference's accuracy."""
    per_name = {name: [runs[i] for runs in seeds] for i, name in enumerate(names)}

    def timed(name: str) -> list[float]:  # all rounds but each seed's first, in round order
        return [t for run in per_name[name] for t in (run.epoch_times[1:] or run.epoch_times)]

    ref_final = statistics.fmean(run.test_acc[-1] for run in per_name[reference])
    results: dict[str, dict[str, Any]] = {}
    for name, runs in per_name.items():
        epoch_s = common.spread(timed(name))
        acc_curve = mean_curve([run.test_acc for run in runs])
        reached = next((i + 1 for i, a in enumerate(acc_curve) if a >= ref_final), None)
        finals = [run.test_acc[-1] for run in runs]
        results[name] = {
            "description": OPTIMIZERS[name].describe(lrs[name]),
            "lr": lrs[name],
            "epoch_s": epoch_s,
            "ratio_to_reference": common.paired_ratios(timed(name), timed(reference)),
            "first_epoch_s": [run.epoch_times[0] for run in runs],
            "final_test_accuracy_mean": statistics.fmean(finals),
            "final_test_accuracy_std": std(finals),
            "final_train_loss_mean": statistics.fmean(run.train_loss[-1] for run in runs),
            "test_accuracy_mean_curve": acc_curve,
            "train_loss_mean_curve": mean_curve([run.train_loss for run in runs]),
            # the time axis: epochs × median epoch time (warm-up epoch and stalls excluded)
            "epochs_to_reference_accuracy": reached,
            "time_to_reference_accuracy_s": None if reached is None
            else reached * epoch_s["median"],
            "per_seed": [{"epoch_times_s": run.epoch_times, "train_loss": run.train_loss,
                          "test_accuracy": run.test_acc, "step_losses": run.step_losses}
                         for run in runs],
        }
    return results


TABLE_HEADERS = ("optimizer", "lr", "epoch ms (p10–p90)", "vs adam, paired (p10–p90)",
                 "final train loss", "test acc % (mean ± std)", "time to adam's acc")


def summary_rows(results: dict[str, dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for name, r in results.items():
        reached = r["epochs_to_reference_accuracy"]
        rows.append([
            name,
            f"{r['lr']:g}",
            common.format_spread(r["epoch_s"], scale=1000, digits=1),
            common.format_spread(r["ratio_to_reference"], suffix="x"),
            f"{r['final_train_loss_mean']:.4f}",
            f"{100 * r['final_test_accuracy_mean']:.2f} ± {100 * r['final_test_accuracy_std']:.2f}",
            "not reached" if reached is None
            else f"{r['time_to_reference_accuracy_s']:.1f} s ({reached} ep)",
        ])
    return rows


def plot(results: dict[str, dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on CI or GPU machines
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_acc, ax_loss) = plt.subplots(1, 3, figsize=(16, 4.5))
    names = list(results)
    medians = [1000 * results[n]["epoch_s"]["median"] for n in names]
    low = [m - 1000 * results[n]["epoch_s"]["p10"] for m, n in zip(medians, names)]
    high = [1000 * results[n]["epoch_s"]["p90"] - m for m, n in zip(medians, names)]
    ax_time.bar(names, medians, yerr=[low, high], capsize=4, color="tab:gray")
    for i, n in enumerate(names):
        ax_time.annotate(f"{results[n]['ratio_to_reference']['median']:.2f}x",
                         (i, medians[i] / 2), ha="center", va="center", color="white")
    ax_time.set(ylabel="epoch time (ms): median, p10–p90 bar",
                title=f"epoch time; label: paired ratio to {REFERENCE}")
    ax_time.tick_params(axis="x", rotation=30)

    curves = []
    for name, r in results.items():
        epochs = range(1, len(r["test_accuracy_mean_curve"]) + 1)
        seconds = [e * r["epoch_s"]["median"] for e in epochs]
        acc = [100 * a for a in r["test_accuracy_mean_curve"]]
        label = f"{name} (lr={r['lr']:g})"
        ax_acc.plot(seconds, acc, marker=".", label=label)
        ax_loss.plot(seconds, r["train_loss_mean_curve"], marker=".", label=label)
        curves.append(acc[len(acc) // 4 :])
    target = 100 * results[REFERENCE]["final_test_accuracy_mean"] if REFERENCE in results else None
    if target is not None:
        ax_acc.axhline(target, color="k", lw=0.8, ls="--", label=f"{REFERENCE}'s final accuracy")
    # zoom on where the optimizers differ: the last three quarters of the curves
    values = [a for c in curves for a in c]
    if values:
        ax_acc.set_ylim(max(0.0, min(values) - 2.0), min(100.0, max(values) + 1.0))
    xlabel = "training time (s) = epochs × median epoch time\n(warm-up epoch and stalls excluded)"
    ax_acc.set(xlabel=xlabel, ylabel="test accuracy (%), mean over seeds",
               title="test accuracy")
    ax_loss.set(xlabel=xlabel, ylabel="train loss (epoch mean, mean over seeds)",
                title="train loss")
    ax_loss.set_yscale("log")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------- lr sweep
def lr_sweep(args: argparse.Namespace, task: Task, data: Data,
             device: torch.device) -> dict[str, Any]:
    """Each optimizer at each lr of its grid, seed 0, trained on the training set minus a
    validation split; the winner has the best final validation accuracy."""
    split = data.validation_split()
    grids = {name: LR_GRID["adafisher" if OPTIMIZERS[name].is_adafisher else "adam"]
             for name in args.optimizers}
    total = sum(len(g) for g in grids.values()) * args.epochs
    table: dict[str, dict[str, float]] = {}
    with common.progress(total, "lr sweep", "epoch", args.no_progress) as bar:
        for name, grid in grids.items():
            table[name] = {}
            for lr in grid:
                (run,) = train_seed([name], {name: lr}, task, split, 0, args.epochs,
                                    args.batch_size, device,
                                    on_round=lambda runs: bar.update(len(runs)))
                table[name][f"{lr:g}"] = run.test_acc[-1]
                bar.set_postfix_str(f"{name} lr={lr:g} val acc={run.test_acc[-1]:.3f}")
    winners = {name: float(max(accs, key=accs.__getitem__)) for name, accs in table.items()}
    rows = [[name, *(f"{100 * accs[k]:.1f}" + ("*" if float(k) == winners[name] else "")
                     for k in accs)] for name, accs in table.items()]
    for name, grid in grids.items():  # rows of different grid lengths: pad
        rows[list(grids).index(name)] += [""] * (max(map(len, grids.values())) - len(grid))
    headers = ["optimizer", *(f"lr #{i + 1}" for i in range(max(map(len, grids.values()))))]
    print(f"\nlr sweep, {args.task}: final validation accuracy % (seed 0, {args.epochs} epochs, "
          f"{len(split.y_train)} train / {len(split.y_test)} validation); * = winner")
    for name, grid in grids.items():
        print(f"  {name}: lr grid {', '.join(f'{lr:g}' for lr in grid)}")
    print(common.format_table(headers, rows))
    spelled = ",".join(f"{n}={lr:g}" for n, lr in winners.items())
    print(f"\nwinners: --lr {spelled}\n(the default run uses SWEPT_LR[{args.task!r}] in "
          "bench/epoch_time.py: store these there to make them the default)")
    payload = {"task": args.task, "epochs": args.epochs, "batch_size": args.batch_size,
               "validation_accuracy": table, "winners": winners,
               "env": common.env_info(device)}
    common.write_json(args.out / "lr_sweep.json", payload)
    return payload


# ------------------------------------------------------------------------------ command line
def optimizer_list(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown optimizer(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(OPTIMIZERS)}"
        )
    return list(dict.fromkeys(names))  # drop repeats, keep order


def lr_overrides(text: str) -> dict[str, float]:
    """``adam=3e-3,adafisher=1e-3`` -> {name: lr}."""
    lrs = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name.strip().lower() not in OPTIMIZERS:
            raise argparse.ArgumentTypeError(
                f"expected NAME=LR with NAME from {', '.join(OPTIMIZERS)}, got {item!r}")
        lrs[name.strip().lower()] = common.positive_float(value)
    return lrs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--task", choices=list(TASKS), default="mnist1d",
                   help="data set and model (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda[:N]")
    p.add_argument("--threads", type=common.positive_int, default=DEFAULT_THREADS,
                   help="torch CPU threads, pinned for the run (default: %(default)s; one thread "
                        "per process keeps epoch times steady on a loaded machine)")
    p.add_argument("--epochs", type=common.positive_int, default=None,
                   help="epochs per seed (default: the task's, " + ", ".join(
                       f"{n} {t.epochs}" for n, t in TASKS.items()) + ")")
    p.add_argument("--seeds", type=common.positive_int, default=None,
                   help="seeds 0..N-1 (default: the task's, " + ", ".join(
                       f"{n} {t.seeds}" for n, t in TASKS.items()) + ")")
    p.add_argument("--batch-size", type=common.positive_int, default=None,
                   help="default: the task's (" + ", ".join(
                       f"{n} {t.batch_size}" for n, t in TASKS.items()) + ")")
    p.add_argument(
        "--optimizers", type=optimizer_list, default=list(DEFAULT_OPTIMIZERS),
        help=f"comma list from: {', '.join(OPTIMIZERS)} (default: {','.join(DEFAULT_OPTIMIZERS)})",
    )
    p.add_argument("--lr", type=lr_overrides, default={}, metavar="NAME=LR,...",
                   help="override the stored --lr-sweep winners, e.g. adam=3e-3,adafisher=1e-3")
    p.add_argument("--lr-sweep", action="store_true",
                   help="instead of the comparison, sweep each optimizer's lr on a validation "
                        "split (20%% of the training set, seed 0) and print the winners")
    p.add_argument("--out", type=Path, default=Path("results"),
                   help="output folder (default: results)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, torch.device]:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = common.device_or_error(parser, args.device)
    task = TASKS[args.task]
    args.epochs = args.epochs or task.epochs
    args.seeds = args.seeds or task.seeds
    args.batch_size = args.batch_size or task.batch_size
    if not args.lr_sweep and REFERENCE not in args.optimizers:
        args.optimizers.insert(0, REFERENCE)  # the figures are relative to it
    if any(OPTIMIZERS[n].is_adafisher for n in args.optimizers):
        try:
            common.import_adafisher()
        except ImportError as exc:
            parser.error(f"{exc}; run from the repository root or `pip install -e .`")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a folder")
    return args, device


def compare(args: argparse.Namespace, task: Task, data: Data,
            device: torch.device) -> dict[str, Any]:
    lrs = {name: args.lr.get(name, SWEPT_LR[args.task][name]) for name in args.optimizers}
    overridden = sorted(set(args.lr) & set(args.optimizers))
    seeds: list[list[Run]] = []
    rounds = args.seeds * args.epochs
    with common.progress(rounds, "training", "round", args.no_progress) as bar:
        for seed in range(args.seeds):
            def on_round(runs: list[Run], seed: int = seed) -> None:
                accs = " ".join(f"{r.name}={r.test_acc[-1]:.3f}" for r in runs)
                bar.set_postfix_str(f"seed {seed} epoch {len(runs[0].test_acc)}: acc {accs}",
                                    refresh=False)
                bar.update(1)

            seeds.append(train_seed(args.optimizers, lrs, task, data, seed, args.epochs,
                                    args.batch_size, device, on_round))
    results = summarize(args.optimizers, seeds, lrs, REFERENCE)
    untrusted = [n for n, r in results.items() if not r["ratio_to_reference"]["trusted"]]
    lr_source = (f"stored --lr-sweep winners for {args.task} (validation split)"
                 + (f"; overridden by --lr for {', '.join(overridden)}" if overridden else ""))
    return {"results": results, "lr_source": lr_source, "untrusted": untrusted}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, device = parse_args(argv)
    task = TASKS[args.task]
    with common.pinned_threads(args.threads if device.type == "cpu" else None):
        started = time.perf_counter()
        data = task.load(device)
        warm_up(task, data, args.batch_size, device)
        if args.lr_sweep:
            return lr_sweep(args, task, data, device)
        outcome = compare(args, task, data, device)
        env = common.env_info(device)
    total = time.perf_counter() - started
    results = outcome["results"]
    payload = {
        "task": args.task,
        "task_description": task.description,
        "config": {"epochs": args.epochs, "seeds": args.seeds, "batch_size": args.batch_size,
                   "threads": args.threads, "optimizers": args.optimizers,
                   "reference": REFERENCE, "lr_source": outcome["lr_source"],
                   "timed_rounds": "every seed's epochs but its first (warm-up)",
                   "trusted_relative_spread": common.TRUSTED_RELATIVE_SPREAD},
        "env": env,
        "total_run_s": total,
        "untrusted": outcome["untrusted"],
        "results": results,
    }
    common.write_json(args.out / "epoch_time.json", payload)
    title = (f"{task.description}: {args.seeds} seed(s) × {args.epochs} epochs, "
             f"batch {args.batch_size}, {device}, {args.threads} thread(s)")
    try:
        plot(results, title, args.out / "epoch_time.png")
    except ImportError as exc:  # matplotlib is optional: the JSON holds the same numbers
        print(f"warning: no plot ({exc})", file=sys.stderr)
    table = common.format_table(TABLE_HEADERS, summary_rows(results))
    print(f"\n{title}\nlr: {outcome['lr_source']}\n"
          f"times: median over {args.seeds * (args.epochs - 1) or args.seeds} rounds (each "
          "seed's first epoch left out as warm-up); ratios paired round by round; "
          f"accuracy target: {REFERENCE}'s final mean test accuracy\n{table}")
    if outcome["untrusted"]:
        print(f"\nWARNING: the paired ratios of {', '.join(outcome['untrusted'])} spread more "
              f"than {common.TRUSTED_RELATIVE_SPREAD:.0%} of their median (p10–p90, marked !): "
              "the machine's load changed during the run; do not trust these time figures "
              "(rerun on a quieter machine, or with more --seeds for more rounds).")
    print(f"\ntotal {total:.0f} s; wrote {args.out / 'epoch_time.json'} and "
          f"{args.out / 'epoch_time.png'}")
    return payload


if __name__ == "__main__":
    main()
