"""High-throughput single-GPU ImageNet training (torchvision models), or a synthetic benchmark.

    python bench/imagenet.py --data /datasets/imagenet --optimizer adafisher
    python bench/imagenet.py --synthetic --optimizer adamw --steps 60 --json results/adamw.json
    python bench/imagenet.py --synthetic --arch resnet18 --image-size 64 --steps 3   # CPU smoke

`--data DIR` reads ImageFolder `DIR/train` and `DIR/val` with the standard augmentation;
`--synthetic` generates random batches on the device, to time the model and optimizer without
the input pipeline. Every training step is timed (the device is synchronized at its end); the
first `--timing-warmup` steps are left out. Reports images/s, epoch time, step time (median;
for AdaFisher also split into steps that take curvature statistics and steps that do not),
optimizer-step time, peak GPU memory and top-1/top-5 on val. `--compare-to` another run's JSON
adds the step-time and memory ratios against it. torchvision is an optional dependency.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    from bench import common
except ImportError:  # run as `python bench/imagenet.py`: bench/ itself is on sys.path
    import common

OPTIMIZERS = ("adafisher", "adafisherw", "adam", "adamw", "sgd")
DEFAULT_LR = {"adafisher": 1e-3, "adafisherw": 1e-3, "adam": 1e-3, "adamw": 1e-3, "sgd": 0.1}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CKPT_FORMAT = 1


# ------------------------------------------------------------------------------ arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="folder with ImageFolder train/ and val/")
    src.add_argument("--synthetic", action="store_true", help="random batches made on the device")

    m = p.add_argument_group("model and run")
    m.add_argument("--arch", default="resnet50", help="any torchvision classification model")
    m.add_argument("--num-classes", type=common.positive_int, default=1000,
                   help="synthetic only; --data takes it from train/")
    m.add_argument("--image-size", type=common.positive_int, default=224)
    m.add_argument("--batch-size", type=common.positive_int,
                   help="default 256 on cuda, 16 on cpu")
    m.add_argument("--epochs", type=common.positive_int,
                   help="default 90 with --data, 1 with --synthetic")
    m.add_argument("--steps", type=common.positive_int,
                   help="cap on steps per epoch (synthetic default 100)")
    m.add_argument("--val-steps", type=common.positive_int, help="cap on val batches")
    m.add_argument("--workers", type=common.nonnegative_int, default=min(8, os.cpu_count() or 1))
    m.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda[:N]")
    m.add_argument("--amp", choices=("bf16", "none"), help="autocast dtype; default bf16 on cuda")
    m.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    m.add_argument("--compile", action="store_true", help="torch.compile the model")
    m.add_argument("--seed", type=common.nonnegative_int, default=0)
    m.add_argument("--timing-warmup", type=common.nonnegative_int,
                   help="untimed first steps (cudnn autotuning, compilation, allocator); "
                   "default 5 on cuda, 1 on cpu")
    m.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    o = p.add_argument_group("optimizer and schedule")
    o.add_argument("--optimizer", choices=OPTIMIZERS, default="adafisher")
    o.add_argument("--lr", type=common.positive_float,
                   help="default 1e-3; sgd: 0.1 x batch/256")
    o.add_argument("--weight-decay", type=common.nonnegative_float, default=1e-4,
                   help="not applied to norms and biases (the paper: 1e-4 for all optimizers)")
    o.add_argument("--momentum", type=common.unit_float, default=0.9, help="sgd")
    o.add_argument("--nesterov", action="store_true", help="sgd")
    o.add_argument("--betas", type=common.unit_float, nargs=2, default=(0.9, 0.999),
                   metavar=("B1", "B2"), help="adam/adamw")
    o.add_argument("--eps", type=common.positive_float, default=1e-8, help="adam/adamw")
    o.add_argument("--fused", action=argparse.BooleanOptionalAction,
                   help="fused adam/adamw/sgd kernels; default on cuda")
    o.add_argument("--beta", type=common.unit_float, default=0.9, help="adafisher momentum")
    o.add_argument("--damping", type=common.positive_float, default=1e-3, help="adafisher")
    o.add_argument("--gammas", type=common.nonnegative_float, nargs=2, default=(0.92, 0.008),
                   metavar=("G1", "G2"), help="adafisher factor blending")
    o.add_argument("--factor-interval", type=common.positive_int, default=100, help="adafisher")
    o.add_argument("--backend", default="auto", help="adafisher backend")
    o.add_argument("--warmup-epochs", type=common.nonnegative_float,
                   help="linear warm-up before the cosine decay; default 5 with --data, else 0")
    o.add_argument("--label-smoothing", type=common.unit_float, default=0.1)

    io = p.add_argument_group("checkpoints and output")
    io.add_argument("--checkpoint", type=Path, help="save here after every epoch")
    io.add_argument("--resume", type=Path, help="continue from this checkpoint")
    io.add_argument("--json", type=Path, help="write the figures here")
    io.add_argument("--compare-to", type=Path,
                    help="JSON of a reference run (e.g. adamw): adds step-time/memory ratios")
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, torch.device]:
    """Parse and validate; every user mistake ends in parser.error, never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    device = common.device_or_error(parser, args.device)
    try:
        import torchvision  # noqa: F401  (optional dependency: only this script needs it)
    except Exception as exc:  # a torchvision built for another torch raises RuntimeError
        parser.error(f"torchvision is required for this benchmark ({exc})")
    if args.arch not in classification_archs():
        parser.error(f"unknown --arch {args.arch!r}; torchvision has e.g. resnet18, resnet50, "
                     "convnext_tiny, vit_b_16 (see torchvision.models.list_models())")
    if args.data is not None:
        problem = data_folder_problem(args.data)
        if problem:
            parser.error(problem)
    if args.optimizer.startswith("adafisher"):
        try:
            common.import_adafisher()
        except ImportError as exc:
            parser.error(str(exc))
    for name in ("resume", "compare_to"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            parser.error(f"--{name.replace('_', '-')} {path}: no such file")
    if args.fused and args.optimizer.startswith("adafisher"):
        parser.error("--fused applies to adam, adamw and sgd only")
    fill_defaults(args, device)
    return args, device


def fill_defaults(args: argparse.Namespace, device: torch.device) -> None:
    """Defaults that depend on the device or the data source."""
    cuda = device.type == "cuda"
    if args.batch_size is None:
        args.batch_size = 256 if cuda else 16  # CPU: keep the smoke run tiny
    if args.timing_warmup is None:
        args.timing_warmup = 5 if cuda else 1
    if args.amp is None:
        args.amp = "bf16" if cuda else "none"
    if args.fused is None:
        args.fused = cuda and args.optimizer in ("adam", "adamw", "sgd")
    if args.epochs is None:
        args.epochs = 1 if args.synthetic else 90
    if args.synthetic and args.steps is None:
        args.steps = 100
    if args.warmup_epochs is None:
        args.warmup_epochs = 0.0 if args.synthetic else 5.0
    if args.lr is None:
        scale = args.batch_size / 256 if args.optimizer == "sgd" else 1.0  # linear scaling rule
        args.lr = DEFAULT_LR[args.optimizer] * scale


def classification_archs() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def data_folder_problem(root: Path) -> str | None:
    if not root.is_dir():
        return f"--data {root}: no such folder"
    missing = [sub for sub in ("train", "val") if not (root / sub).is_dir()]
    if missing:
        return (f"--data {root} must hold ImageFolder subfolders train/ and val/ "
                f"(one folder per class); missing: {', '.join(m + '/' for m in missing)}")
    return None


# ------------------------------------------------------------------------------ model, optimizer
def build_model(args: argparse.Namespace, num_classes: int, device: torch.device) -> nn.Module:
    import torchvision

    torch.manual_seed(args.seed)  # same initial weights for every optimizer
    model = torchvision.models.get_model(args.arch, weights=None, num_classes=num_classes)
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms and biases: by convention, every parameter with ndim <= 1."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, args.weight_decay)
    if args.optimizer.startswith("adafisher"):
        af = common.import_adafisher()
        cls = af.AdaFisherW if args.optimizer == "adafisherw" else af.AdaFisher
        return cls(model, groups, lr=args.lr, beta=args.beta, damping=args.damping,
                   gammas=tuple(args.gammas), factor_interval=args.factor_interval,
                   backend=args.backend)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum,
                               nesterov=args.nesterov, fused=args.fused or None)
    cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=args.lr, betas=tuple(args.betas), eps=args.eps,
               fused=args.fused or None)


def cosine_with_warmup(opt: torch.optim.Optimizer, warmup: int, total: int) -> Any:
    """Per-step schedule: linear warm-up to the base lr, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup  # not 0 at step 0: that step would be wasted
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ------------------------------------------------------------------------------ data
@dataclass
class Source:
    num_classes: int
    steps_per_epoch: int
    train: Any = None  # DataLoader (None for synthetic)
    val: Any = None


def build_source(args: argparse.Namespace, device: torch.device) -> Source:
    if args.synthetic:
        return Source(args.num_classes, args.steps)
    import torchvision.datasets as tvd
    import torchvision.transforms as tvt

    normalize = tvt.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = tvt.Compose([tvt.RandomResizedCrop(args.image_size), tvt.RandomHorizontalFlip(),
                            tvt.ToTensor(), normalize])
    val_tf = tvt.Compose([tvt.Resize(round(args.image_size / 0.875)),
                          tvt.CenterCrop(args.image_size), tvt.ToTensor(), normalize])
    train_set = tvd.ImageFolder(str(args.data / "train"), train_tf)
    val_set = tvd.ImageFolder(str(args.data / "val"), val_tf)
    if train_set.classes != val_set.classes:
        raise SystemExit(f"error: {args.data}: train/ and val/ have different class folders")
    loader_kw = {"batch_size": args.batch_size, "num_workers": args.workers,
                 "pin_memory": device.type == "cuda", "persistent_workers": args.workers > 0}
    train = torch.utils.data.DataLoader(train_set, shuffle=True, drop_last=True, **loader_kw)
    val = torch.utils.data.DataLoader(val_set, shuffle=False, **loader_kw)
    if len(train) == 0:
        raise SystemExit(f"error: {args.data}/train has fewer images than one batch")
    steps = min(len(train), args.steps) if args.steps else len(train)
    return Source(len(train_set.classes), steps, train, val)


def synthetic_batches(args: argparse.Namespace, num_classes: int, device: torch.device,
                      steps: int, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, ...]]:
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    for _ in range(steps):
        x = torch.empty(shape, device=device, memory_format=fmt).normal_(generator=gen)
        y = torch.randint(0, num_classes, (args.batch_size,), device=device, generator=gen)
        yield x, y


def epoch_batches(args: argparse.Namespace, source: Source, device: torch.device, epoch: int,
                  gen: torch.Generator | None) -> Iterator[tuple[torch.Tensor, ...]]:
    if source.train is None:
        return synthetic_batches(args, source.num_classes, device, source.steps_per_epoch, gen)
    torch.manual_seed(args.seed + epoch)  # reproducible shuffling and augmentation per epoch
    return (batch for _, batch in zip(range(source.steps_per_epoch), source.train))


# ------------------------------------------------------------------------------ training
@dataclass
class Timings:
    """Per timed step: wall time (synchronized), optimizer-step time, statistics flag."""

    step_s: list[float] = field(default_factory=list)
    opt_s: list[float] = field(default_factory=list)
    stats_step: list[bool] = field(default_factory=list)


def autocast(args: argparse.Namespace, device: torch.device) -> AbstractContextManager:
    if args.amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def takes_statistics(args: argparse.Namespace, step: int) -> bool:
    """AdaFisher takes curvature statistics before optimizer step k when k % interval == 0."""
    return args.optimizer.startswith("adafisher") and step % args.factor_interval == 0


@dataclass
class Trainer:
    args: argparse.Namespace
    device: torch.device
    model: nn.Module  # what runs forward (maybe compiled)
    opt: torch.optim.Optimizer
    sched: Any
    global_step: int = 0
    first_step: int = 0  # of this process: timing skips its first --timing-warmup steps
    timings: Timings = field(default_factory=Timings)

    def train_epoch(self, batches: Iterator[tuple[torch.Tensor, ...]], bar: Any) -> dict[str, Any]:
        args, device = self.args, self.device
        loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        cuda = device.type == "cuda"
        self.model.train()
        losses, images = [], 0
        epoch_start = common.now(device)
        for x, y in batches:
            start = time.perf_counter()  # the device is idle here: the last step synchronized
            x = x.to(device, non_blocking=True, memory_format=fmt)
            y = y.to(device, non_blocking=True)
            with autocast(args, device):
                loss = loss_fn(self.model(x), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            opt_begin = _mark(cuda)
            self.opt.step()
            opt_end = _mark(cuda)
            self.sched.step()
            common.synchronize(device)
            step_s = time.perf_counter() - start
            if self.global_step - self.first_step >= args.timing_warmup:
                self.timings.step_s.append(step_s)
                self.timings.opt_s.append(_elapsed(opt_begin, opt_end, cuda))
                self.timings.stats_step.append(takes_statistics(args, self.global_step))
            losses.append(loss.item())  # free: the step already synchronized
            images += x.shape[0]
            self.global_step += 1
            bar.set_postfix(loss=f"{losses[-1]:.3f}", img_s=f"{x.shape[0] / step_s:.0f}",
                            lr=f"{self.sched.get_last_lr()[0]:.2e}", refresh=False)
            bar.update(1)
        epoch_s = common.now(device) - epoch_start
        return {"epoch_s": epoch_s, "steps": len(losses), "images_per_s": images / epoch_s,
                "mean_loss": sum(losses) / max(1, len(losses)),
                "last_loss": losses[-1] if losses else None}


def _mark(cuda: bool) -> Any:
    """A point in time: a CUDA event (no synchronization needed) or perf_counter on CPU."""
    if cuda:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _elapsed(begin: Any, end: Any, cuda: bool) -> float:
    return begin.elapsed_time(end) / 1000 if cuda else end - begin


@torch.no_grad()
def evaluate(args: argparse.Namespace, model: nn.Module, loader: Any,
             device: torch.device) -> dict[str, float]:
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model.eval()
    top1 = top5 = seen = 0
    for i, (x, y) in enumerate(loader):
        if args.val_steps and i >= args.val_steps:
            break
        x = x.to(device, non_blocking=True, memory_format=fmt)
        y = y.to(device, non_blocking=True)
        with autocast(args, device):
            logits = model(x)
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == y[:, None]
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(dim=1).sum().item()
        seen += len(y)
    return {"top1": 100 * top1 / max(1, seen), "top5": 100 * top5 / max(1, seen), "images": seen}


# ------------------------------------------------------------------------------ checkpoints
def save_checkpoint(path: Path, trainer: Trainer, model: nn.Module, next_epoch: int) -> None:
    """Model, optimizer, scheduler, epoch and step; written atomically (a crash keeps the old)."""
    state = {
        "format": CKPT_FORMAT,
        "arch": trainer.args.arch,
        "optimizer_name": trainer.args.optimizer,
        "epoch": next_epoch,
        "global_step": trainer.global_step,
        "model": model.state_dict(),
        "optimizer": trainer.opt.state_dict(),
        "scheduler": trainer.sched.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        # an optimizer state holding non-tensor objects needs full unpickling: only do that
        # for our own checkpoint files, and say so
        print(f"warning: {path} needs full unpickling ({exc}); loading it as trusted",
              file=sys.stderr)
        return torch.load(path, map_location=device, weights_only=False)


def restore(trainer: Trainer, model: nn.Module, path: Path) -> int:
    """Load a checkpoint into model/optimizer/scheduler; returns the epoch to continue from."""
    state = load_checkpoint(path, trainer.device)
    args = trainer.args
    if (state.get("arch"), state.get("optimizer_name")) != (args.arch, args.optimizer):
        raise SystemExit(f"error: {path} holds {state.get('arch')}/{state.get('optimizer_name')}"
                         f", not {args.arch}/{args.optimizer}")
    model.load_state_dict(state["model"])
    trainer.opt.load_state_dict(state["optimizer"])
    trainer.sched.load_state_dict(state["scheduler"])
    trainer.global_step = trainer.first_step = int(state["global_step"])
    torch.set_rng_state(state["torch_rng"].cpu())
    return int(state["epoch"])


# ------------------------------------------------------------------------------ report
def timing_summary(args: argparse.Namespace, t: Timings) -> dict[str, Any]:
    step_ms = [s * 1000 for s in t.step_s]
    stats_ms = [s * 1000 for s, k in zip(t.step_s, t.stats_step) if k]
    plain_ms = [s * 1000 for s, k in zip(t.step_s, t.stats_step) if not k]
    median_ms = common.median(step_ms)
    out: dict[str, Any] = {
        "timed_steps": len(step_ms),
        "step_ms_median": median_ms,
        "step_ms_mean": sum(step_ms) / len(step_ms) if step_ms else None,
        "step_ms_min": min(step_ms) if step_ms else None,
        "opt_step_ms_median": common.median([s * 1000 for s in t.opt_s]),
        "stats_steps": len(stats_ms),
        "step_ms_median_stats": common.median(stats_ms),
        "step_ms_median_plain": common.median(plain_ms),
        "images_per_s": args.batch_size / (median_ms / 1000) if median_ms else None,
    }
    # the cost per step over a whole factor interval: (interval-1) plain steps + 1 stats step
    interval = args.factor_interval if args.optimizer.startswith("adafisher") else 1
    if stats_ms and plain_ms and interval > 1:
        out["step_ms_amortized"] = ((interval - 1) * out["step_ms_median_plain"]
                                    + out["step_ms_median_stats"]) / interval
    else:
        out["step_ms_amortized"] = median_ms
    return out


def compare(report: dict[str, Any], reference_path: Path) -> dict[str, Any]:
    import json

    ref = json.loads(reference_path.read_text())
    return {
        "reference": str(reference_path),
        "reference_optimizer": ref.get("config", {}).get("optimizer"),
        "step_time_ratio": common.ratio(report["timing"]["step_ms_amortized"],
                                        ref["timing"]["step_ms_amortized"]),
        "step_time_ratio_median": common.ratio(report["timing"]["step_ms_median"],
                                               ref["timing"]["step_ms_median"]),
        "peak_memory_ratio": common.ratio(report["peak_gpu_memory_gib"],
                                          ref.get("peak_gpu_memory_gib")),
    }


def print_summary(report: dict[str, Any]) -> None:
    t, c = report["timing"], report["config"]
    rows = [
        ["optimizer", c["optimizer"] + (f" (interval {c['factor_interval']})"
                                        if c["optimizer"].startswith("adafisher") else "")],
        ["model / batch / size", f"{c['arch']} / {c['batch_size']} / {c['image_size']}px"],
        ["images/s (median step)", _fmt(t["images_per_s"], ".0f")],
        ["step ms (median / amortized)",
         f"{_fmt(t['step_ms_median'], '.1f')} / {_fmt(t['step_ms_amortized'], '.1f')}"],
        ["optimizer step ms (median)", _fmt(t["opt_step_ms_median"], ".2f")],
        ["epoch time s", ", ".join(f"{e['epoch_s']:.1f}" for e in report["epochs"])],
        ["peak GPU memory GiB", _fmt(report["peak_gpu_memory_gib"], ".2f")],
    ]
    if report.get("val"):
        rows.append(["val top-1 / top-5 %",
                     f"{report['val']['top1']:.2f} / {report['val']['top5']:.2f}"])
    if report.get("comparison"):
        cmp = report["comparison"]
        rows.append([f"step-time ratio vs {cmp['reference_optimizer']}",
                     _fmt(cmp["step_time_ratio"], ".3f")])
        rows.append(["peak memory ratio", _fmt(cmp["peak_memory_ratio"], ".3f")])
    print(common.format_table(("figure", "value"), rows))


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# ------------------------------------------------------------------------------ main
def setup_backends(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune once (timing warm-up)
        torch.set_float32_matmul_precision("high")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, device = parse_args(argv)
    setup_backends(device)
    source = build_source(args, device)
    model = build_model(args, source.num_classes, device)
    opt = build_optimizer(args, model)  # hooks go on the eager modules, before compiling
    total_steps = args.epochs * source.steps_per_epoch
    sched = cosine_with_warmup(opt, round(args.warmup_epochs * source.steps_per_epoch),
                               total_steps)
    runner = torch.compile(model) if args.compile else model
    trainer = Trainer(args, device, runner, opt, sched)
    start_epoch = restore(trainer, model, args.resume) if args.resume else 0
    gen = torch.Generator(device=device).manual_seed(args.seed + start_epoch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    epochs, val = [], None
    for epoch in range(start_epoch, args.epochs):
        batches = epoch_batches(args, source, device, epoch, gen)
        with common.progress(source.steps_per_epoch, f"epoch {epoch + 1}/{args.epochs}",
                             "step", args.no_progress) as bar:
            epochs.append({"epoch": epoch, **trainer.train_epoch(batches, bar)})
        if source.val is not None:
            val = evaluate(args, runner, source.val, device)
            epochs[-1]["val"] = val
        if args.checkpoint:
            save_checkpoint(args.checkpoint, trainer, model, epoch + 1)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if hasattr(opt, "remove_hooks"):
        opt.remove_hooks()
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "env": common.env_info(device),
        "start_epoch": start_epoch,
        "global_step": trainer.global_step,
        "epochs": epochs,
        "timing": timing_summary(args, trainer.timings),
        "peak_gpu_memory_gib": peak,
        "val": val,
    }
    if args.compare_to:
        report["comparison"] = compare(report, args.compare_to)
    if args.json:
        common.write_json(args.json, report)
    print_summary(report)
    return report


if __name__ == "__main__":
    main()
