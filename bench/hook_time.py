"""CPU cost of the statistics hooks per forward + backward pass, where Python dominates.

A 41-layer net of tiny layers (20 × Conv2d(4, 4, 3) + BatchNorm2d + ReLU, then a Linear) on a
batch of 2 × 4 × 4 × 4: the layers' own kernels take microseconds, so what a statistics pass
adds is mostly the hooks' Python and the dispatch of their ops. Two copies of the net run
interleaved round by round (order swapped every round, threads pinned): ``plain`` (no
optimizer) and ``adafisher`` (AdaFisher with ``factor_interval=1``: every pass feeds
statistics). Reported: milliseconds per pass (median) of each, and the paired per-round
ratio adafisher/plain for the forward, the backward and the whole pass (median, p10–p90).

    python bench/hook_time.py                       # backend auto, 1 thread, 30 rounds
    python bench/hook_time.py --backend torch --out /tmp/r

``--model resnet20`` times ``bench/train_step.py``'s CIFAR ResNet-20 on a full batch instead
(``--batch-size``, default 64; use ``--threads 2``): there the statistics' own reads of every
activation and output gradient dominate, and the forward/backward split shows where the
interval-1 training step's overhead over Adam goes. The paired per-round differences
(adafisher − plain, ms per pass) are reported beside the ratios.

    python bench/hook_time.py --model resnet20 --threads 2 --passes 1 --rounds 60
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from adafisher import AdaFisher  # noqa: E402
from adafisher.backends import BACKENDS  # noqa: E402
from bench import common  # noqa: E402

PHASES = ("forward", "backward")


def tiny_net(blocks: int = 20, width: int = 4) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                   nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * 16, 3))


def _timed_passes(model: nn.Module, x: torch.Tensor, passes: int) -> dict[str, float]:
    spent = dict.fromkeys(PHASES, 0.0)
    for _ in range(passes):
        start = time.perf_counter()
        out = model(x)
        middle = time.perf_counter()
        out.sum().backward()
        spent["forward"] += middle - start
        spent["backward"] += time.perf_counter() - middle
    return {phase: seconds / passes for phase, seconds in spent.items()}


def _nets_and_input(args: argparse.Namespace) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    if args.model == "tiny":
        blocks = args.blocks or 20
        return tiny_net(blocks), tiny_net(blocks), torch.randn(2, 4, 4, 4)
    from bench.train_step import cifar_resnet  # noqa: PLC0415 (only for this model)

    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        nets.append(cifar_resnet())
    return nets[0], nets[1], torch.randn(args.batch_size or 64, 3, 32, 32)


def run(args: argparse.Namespace) -> dict[str, Any]:
    plain, hooked, x = _nets_and_input(args)
    optimizer = AdaFisher(hooked, factor_interval=1, backend=args.backend)
    models = {"plain": plain, "adafisher": hooked}
    samples: dict[str, dict[str, list[float]]] = {
        name: {phase: [] for phase in (*PHASES, "pass")} for name in models}
    for round_index in range(args.warmup_rounds + args.rounds):
        names = list(models) if round_index % 2 == 0 else list(models)[::-1]
        for name in names:
            seconds = _timed_passes(models[name], x, args.passes)
            if round_index >= args.warmup_rounds:
                for phase in PHASES:
                    samples[name][phase].append(seconds[phase])
                samples[name]["pass"].append(sum(seconds.values()))
        hooked.zero_grad(set_to_none=True)
        optimizer.step()  # consumes the pending statistics; the next round feeds again
        plain.zero_grad(set_to_none=True)
    ratios = {phase: common.paired_ratios(samples["adafisher"][phase], samples["plain"][phase])
              for phase in (*PHASES, "pass")}
    extra_ms = {phase: common.spread([1e3 * (a - b) for a, b in zip(
        samples["adafisher"][phase], samples["plain"][phase])]) for phase in (*PHASES, "pass")}
    result = {
        "model": args.model, "input_shape": list(x.shape),
        "backend": optimizer.backend, "threads": args.threads, "rounds": args.rounds,
        "passes_per_round": args.passes, "tracked_layers": len(optimizer.tracked_layers),
        "ms_per_pass": {name: {phase: 1e3 * common.quantile(values, 0.5)
                               for phase, values in phases.items()}
                        for name, phases in samples.items()},
        "adafisher_vs_plain": ratios,
        "adafisher_minus_plain_ms": extra_ms,
    }
    rows = [[phase, *(f"{result['ms_per_pass'][name][phase]:.3f}" for name in models),
             common.format_spread(ratios[phase], digits=3, suffix="x"),
             common.format_spread(extra_ms[phase], digits=2)]
            for phase in (*PHASES, "pass")]
    print(f"\nstatistics hooks, {args.model} net {tuple(x.shape)}, "
          f"{result['tracked_layers']} tracked layers, backend {optimizer.backend}, "
          f"{args.threads} thread(s); {args.rounds} rounds of {args.passes} passes "
          "(median, p10–p90)")
    print(common.format_table(["phase", "plain ms", "adafisher ms", "adafisher/plain, paired",
                               "adafisher − plain ms, paired"], rows))
    common.write_json(args.out / "hook_time.json", result)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=common.positive_int, default=1)
    parser.add_argument("--rounds", type=common.positive_int, default=30)
    parser.add_argument("--warmup-rounds", type=common.nonnegative_int, default=2)
    parser.add_argument("--passes", type=common.positive_int, default=5,
                        help="forward + backward passes per timed sample")
    parser.add_argument("--model", choices=("tiny", "resnet20"), default="tiny",
                        help="the tiny Python-bound net, or train_step.py's ResNet-20 at a "
                             "full batch (default: %(default)s)")
    parser.add_argument("--blocks", type=common.positive_int, default=None,
                        help="tiny net: conv + BatchNorm + ReLU blocks, 2 tracked layers each "
                             "(default: 20)")
    parser.add_argument("--batch-size", type=common.positive_int, default=None,
                        help="resnet20: the batch (default: 64)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--out", type=Path, default=Path("results"),
                        help="writes OUT/hook_time.json (default: results)")
    args = parser.parse_args(argv)
    if args.model == "tiny" and args.batch_size is not None:
        parser.error("--batch-size applies to --model resnet20 (the tiny net's batch is 2)")
    if args.model == "resnet20" and args.blocks is not None:
        parser.error("--blocks applies to --model tiny (ResNet-20's layout is fixed)")
    with common.pinned_threads(args.threads):
        return run(args)


if __name__ == "__main__":
    main()
