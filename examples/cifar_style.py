"""A CIFAR-style training script with AdaFisher: copy it and replace the model and the data.

ResNet-style CNN, no weight decay on norms and biases, linear warm-up then cosine decay per
step, evaluation each epoch, a checkpoint (model + optimizer + scheduler) that resumes
exactly. The paper's CIFAR setting is lr 1e-3, weight decay 5e-4, batch 256, 200 epochs
(docs/hyperparameters.md).

    python examples/cifar_style.py                        # random CIFAR-shaped data, CPU is fine
    python examples/cifar_style.py --data ~/data --epochs 200 --device cuda   # CIFAR-10
    python examples/cifar_style.py --resume ckpt.pt       # continue from a checkpoint
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adafisher import AdaFisher


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels),
                                  nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


def make_model(width: int, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        conv_bn(3, width), Residual(width),
        conv_bn(width, 2 * width, stride=2), Residual(2 * width),
        conv_bn(2 * width, 4 * width, stride=2), Residual(4 * width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, classes),
    )


def loaders(args: argparse.Namespace) -> tuple[DataLoader, DataLoader]:
    if args.data is None:  # random CIFAR-shaped data: checks the loop, learns nothing real
        g = torch.Generator().manual_seed(0)
        train = TensorDataset(torch.randn(args.samples, 3, 32, 32, generator=g),
                              torch.randint(0, 10, (args.samples,), generator=g))
        test = TensorDataset(torch.randn(args.samples // 4, 3, 32, 32, generator=g),
                             torch.randint(0, 10, (args.samples // 4,), generator=g))
    else:
        import torchvision
        from torchvision import transforms as T

        norm = T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
        train = torchvision.datasets.CIFAR10(
            args.data, train=True, download=True,
            transform=T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                                 T.ToTensor(), norm]))
        test = torchvision.datasets.CIFAR10(args.data, train=False, download=True,
                                            transform=T.Compose([T.ToTensor(), norm]))
    return (DataLoader(train, args.batch_size, shuffle=True, drop_last=True,
                       num_workers=args.workers),
            DataLoader(test, 2 * args.batch_size, num_workers=args.workers))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    """Linear warm-up, then cosine decay to 0, per step. A warm-up matters with AdaFisher: its
    effective step grows after the second factor update (docs/hyperparameters.md)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
        total += len(y)
    model.train()
    return correct / max(1, total)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None, help="CIFAR-10 folder (torchvision)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--samples", type=int, default=1024, help="random-data size (no --data)")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--factor-interval", type=int, default=100)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--checkpoint", type=Path, default=None, help="write one after each epoch")
    p.add_argument("--resume", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = make_model(args.width).to(device)
    # the optimizer after the model is on its device: the factors live there
    decay = [q for q in model.parameters() if q.ndim > 1]
    no_decay = [q for q in model.parameters() if q.ndim <= 1]
    optimizer = AdaFisher(model, [{"params": decay, "weight_decay": args.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}],
                          lr=args.lr, factor_interval=args.factor_interval)
    train_loader, test_loader = loaders(args)
    scheduler = warmup_cosine(optimizer, args.warmup_steps, args.epochs * len(train_loader))
    start_epoch = 0
    if args.resume is not None:
        state = torch.load(args.resume, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1

    loss_fn = nn.CrossEntropyLoss()
    result = {}
    for epoch in range(start_epoch, args.epochs):
        total_loss = 0.0
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item()
        result = {"epoch": epoch, "train_loss": total_loss / len(train_loader),
                  "test_accuracy": evaluate(model, test_loader, device)}
        print(f"epoch {epoch}: train loss {result['train_loss']:.4f}, "
              f"test accuracy {100 * result['test_accuracy']:.2f}%")
        if args.checkpoint is not None:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "epoch": epoch}, args.checkpoint)
    return result


if __name__ == "__main__":
    main()
