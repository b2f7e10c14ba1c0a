"""Launch census of the Triton statistics path: kernel launches and torch ops per pass.

Counts, for one forward + backward pass (and for ``step()``), every Triton kernel launch (by
wrapping the kernels of ``adafisher.kernels``) and every torch op that is not a view (a
``TorchDispatchMode``), and records each launch's specialization key (constexprs and the
integer/pointer specializations Triton derives from the arguments).

Two ways to run:
- ``--device meta`` (default): shapes only, the launches are recorded and not run, so a
  ResNet-50 at batch 256 or a GPT-style model costs nothing; host time per pass is the Python
  work of the hooks and launchers (Triton's own launch overhead excluded). Real-size
  geometry is planned as for an H100/H200 (``kernels._launch.gpu_like``).
- ``--device cpu`` with ``TRITON_INTERPRET=1``: the kernels run under the interpreter (use
  small models).

Example: ``python -m bench.launch_census --model resnet50 --batch 256`` prints a JSON report.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that launch nothing: allocation without initialization, metadata.
_NO_LAUNCH = {"empty", "empty_strided", "lift_fresh", "detach", "alias", "_local_scalar_dense",
              "sym_size", "sym_stride", "sym_numel", "is_same_size"}


@dataclass
class Census:
    """What one counting window saw."""

    launches: Counter = field(default_factory=Counter)  # kernel name → launches
    torch_ops: Counter = field(default_factory=Counter)  # aten op → calls
    keys: Counter = field(default_factory=Counter)  # (kernel, specialization key) → launches
    grids: list = field(default_factory=list)  # (kernel, grid, constexprs)
    # one record per statistics hook call: [layer kind, "forward"/"backward", launches, ops]
    calls: list = field(default_factory=list)

    @property
    def n_launches(self) -> int:
        return sum(self.launches.values())

    @property
    def n_torch_ops(self) -> int:
        return sum(self.torch_ops.values())

    def per_kind(self) -> dict[str, dict[str, int]]:
        """Per layer kind: hook calls per phase, and the launches and torch ops they made
        (in total and the most in one call)."""
        out: dict[str, dict[str, int]] = {}
        for kind, phase, launches, ops in self.calls:
            row = out.setdefault(kind, Counter())
            row[f"{phase}_calls"] += 1
            row[f"{phase}_launches"] += launches
            row[f"{phase}_torch_ops"] += ops
            row[f"most_{phase}_launches"] = max(row[f"most_{phase}_launches"], launches)
            row[f"most_{phase}_torch_ops"] = max(row[f"most_{phase}_torch_ops"], ops)
        return {kind: dict(row) for kind, row in sorted(out.items())}


class _OpCounter(TorchDispatchMode):
    def __init__(self, census: Census, paused: list[bool], call: list) -> None:
        super().__init__()
        self.census, self.paused, self.call = census, paused, call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused[0] and not func.is_view:
            name = func.overloadpacket.__name__
            if name not in _NO_LAUNCH:
                self.census.torch_ops[name] += 1
                if self.call[0] is not None:
                    self.call[0][3] += 1
        return func(*args, **(kwargs or {}))


def _arg_key(value: Any) -> str:
    """Triton's specialization of one runtime argument (as its JIT keys it)."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":  # allocations are aligned; views keep their offset
            aligned = value.storage_offset() * value.element_size() % 16 == 0
        else:
            aligned = value.data_ptr() % 16 == 0
        return f"*{str(value.dtype).removeprefix('torch.')}{':16' if aligned else ''}"
    if isinstance(value, bool):
        return f"i1={int(value)}"
    if isinstance(value, int):
        if value == 1:
            return "1"
        return "i64" if abs(value) >= 2**31 else ("i32:16" if value % 16 == 0 else "i32")
    if isinstance(value, float):
        return "fp32"
    return type(value).__name__


class _Recorder:
    """Stands in for one kernel: ``kernel[grid](*args, **kw)`` records, then runs or not."""

    def __init__(self, name: str, kernel: Any, census_ref: list, run: bool,
                 paused: list[bool], call: list) -> None:
        self.name, self.kernel, self.census_ref, self.run, self.paused = (
            name, kernel, census_ref, run, paused)
        self.call = call

    def __getattr__(self, item: str) -> Any:
        return getattr(self.kernel, item)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            census = self.census_ref[0]
            if census is not None:
                grid_value = grid(kwargs) if callable(grid) else tuple(grid)
                constexprs = {k: v for k, v in kwargs.items()
                              if k.isupper() or k.startswith("num_")}
                key = (tuple(_arg_key(a) for a in args), tuple(sorted(constexprs.items())))
                census.launches[self.name] += 1
                census.keys[(self.name, key)] += 1
                census.grids.append((self.name, grid_value, constexprs))
                if self.call[0] is not None:
                    self.call[0][2] += 1
            if self.run:
                self.paused[0] = True
                try:
                    return self.kernel[grid](*args, **kwargs)
                finally:
                    self.paused[0] = False
            return None

        return launch


def _kernel_modules() -> list[Any]:
    from adafisher.kernels import blend, conv_patch, fused_step, reductions  # noqa: PLC0415

    return [blend, conv_patch, fused_step, reductions]


class LaunchCensus:
    """Wraps every kernel of ``adafisher.kernels`` for the life of the context;
    ``with census.count() as c:`` counts one window. ``run=False`` records launches only (meta
    device)."""

    def __init__(self, run: bool = True) -> None:
        self.run = run
        self._current: list = [None]
        self._paused = [False]
        self._call: list = [None]  # the record of the statistics hook call under way
        self._patched: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> LaunchCensus:
        from adafisher.hooks import StatisticsCollector  # noqa: PLC0415

        for module in _kernel_modules():
            for name, value in vars(module).items():
                # launched kernels only (jitted helpers are called from inside kernels)
                if name.endswith("_kernel") and hasattr(value, "__getitem__"):
                    self._patched.append((module, name, value))
                    setattr(module, name, _Recorder(name.strip("_"), value, self._current,
                                                    self.run, self._paused, self._call))
        # attribute launches and ops to the layer whose hook makes them
        for name, phase in (("_collect", "forward"), ("_on_grad", "backward")):
            original = StatisticsCollector.__dict__[name]
            self._patched.append((StatisticsCollector, name, original))
            setattr(StatisticsCollector, name, self._attributing(original, phase))
        return self

    def _attributing(self, fn: Any, phase: str) -> Any:
        call_ref, census_ref = self._call, self._current

        def wrapper(collector, layer, *args, **kwargs):
            census = census_ref[0]
            if census is None or call_ref[0] is not None:
                return fn(collector, layer, *args, **kwargs)
            record = [layer.slot.kind.name.lower(), phase, 0, 0]
            call_ref[0] = record
            try:
                return fn(collector, layer, *args, **kwargs)
            finally:
                call_ref[0] = None
                census.calls.append(record)

        return functools.update_wrapper(wrapper, fn)  # keeps fn's attributes (``prepare``)

    def __exit__(self, *exc: object) -> None:
        for module, name, value in reversed(self._patched):
            setattr(module, name, value)
        self._patched.clear()

    @contextlib.contextmanager
    def count(self) -> Iterator[Census]:
        census = Census()
        self._current[0] = census
        try:
            with _OpCounter(census, self._paused, self._call):
                yield census
        finally:
            self._current[0] = None


# ------------------------------------------------------------------------------- models
class _Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        width, out = planes, planes * 4
        self.conv1, self.bn1 = nn.Conv2d(inplanes, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride,
                                                      bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


def resnet50(num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-50 (v1.5) layer for layer: 53 convs, 53 BatchNorms, 1 Linear."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
                               nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                               nn.MaxPool2d(3, stride=2, padding=1)]
    inplanes = 64
    for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(_Bottleneck(inplanes, planes, stride if i == 0 else 1))
            inplanes = planes * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, num_classes)]
    return nn.Sequential(*layers)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        attn = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    """GPT-2-small-shaped: 12 blocks of LayerNorm, qkv/proj/MLP Linears; tied-free LM head."""

    def __init__(self, vocab: int = 50304, dim: int = 768, depth: int = 12, heads: int = 12,
                 context: int = 1024) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*[_Block(dim, heads) for _ in range(depth)])
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


def build(model: str, batch: int, device: torch.device, dtype: torch.dtype,
          small: bool) -> tuple[nn.Module, torch.Tensor]:
    if model == "resnet50":
        net = resnet50()
        size = 32 if small else 224
        x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
        net = net.to(device=device, dtype=dtype, memory_format=torch.channels_last)
        return net, x.to(memory_format=torch.channels_last)
    if small:
        net, context = GPT(vocab=64, dim=32, depth=2, heads=2, context=16), 16
    else:
        net, context = GPT(), 1024
    idx = torch.randint(0, 64 if small else 50304, (batch, context), device=device)
    return net.to(device=device, dtype=dtype), idx


@contextlib.contextmanager
def meta_planning() -> Iterator[None]:
    """Let the Triton backend plan for meta tensors (shapes-only runs): launches are recorded
    by the census and never reach a device. Restored on exit."""
    from adafisher import hooks  # noqa: PLC0415
    from adafisher.backends import triton_backend  # noqa: PLC0415
    patches = [
        (triton_backend, "_runs_on", lambda device, interpreted: True),
        (hooks, "_autocast_enabled", lambda device_type: False),  # meta has no autocast
    ]
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


@contextlib.contextmanager
def hook_timer() -> Iterator[list[float]]:
    """CPU seconds of this thread inside the optimizer's statistics hooks (forward and
    backward): the host work a statistics pass adds, kernel launches (recorded, not run)
    excluded. Thread CPU time, so other processes on the machine do not inflate it."""
    from adafisher.hooks import StatisticsCollector  # noqa: PLC0415

    spent = [0.0]
    originals = {name: getattr(StatisticsCollector, name) for name in ("_collect", "_on_grad")}

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.thread_time() - start

        return wrapper

    for name, fn in originals.items():
        setattr(StatisticsCollector, name, timed(fn))
    try:
        yield spent
    finally:
        for name, fn in originals.items():
            setattr(StatisticsCollector, name, fn)


def measure(model: str, batch: int, device: torch.device, dtype: torch.dtype, passes: int,
            small: bool) -> dict[str, Any]:
    """Launches and torch ops per statistics pass (steady state: the second pass) and per
    step, and the host time the hooks take per pass (median of ``passes``)."""

    with meta_planning() if device.type == "meta" else contextlib.nullcontext():
        return _measure(model, batch, device, dtype, passes, small)


def _measure(model: str, batch: int, device: torch.device, dtype: torch.dtype, passes: int,
             small: bool) -> dict[str, Any]:
    from adafisher import AdaFisherW  # noqa: PLC0415

    torch.manual_seed(0)
    net, x = build(model, batch, device, dtype, small)
    opt = AdaFisherW(net, backend="triton", factor_interval=1)
    run = device.type != "meta"
    report: dict[str, Any] = {"model": model, "batch": batch, "device": str(device),
                              "dtype": str(dtype), "tracked_layers": len(opt.tracked_layers)}
    with LaunchCensus(run=run) as census:
        windows = []
        for _ in range(2):  # the first pass allocates the layers' scratch; the second is steady
            with census.count() as c:
                net(x).float().square().mean().backward()
            windows.append(c)
            with census.count() as step_census:
                opt.step()
            opt.zero_grad()
        hook_seconds = []
        for _ in range(passes):
            with hook_timer() as spent:
                net(x).float().square().mean().backward()
            opt.zero_grad()
            hook_seconds.append(spent[0])
        # the same pass without the optimizer's hooks: what the model itself costs
        opt.remove_hooks()
        with census.count() as plain:
            net(x).float().square().mean().backward()
        opt.zero_grad()
    steady = windows[-1]
    report["first_pass"] = {"launches": windows[0].n_launches,
                            "torch_ops": windows[0].n_torch_ops - plain.n_torch_ops}
    report["pass"] = {
        "launches": steady.n_launches,
        "torch_ops_added": steady.n_torch_ops - plain.n_torch_ops,
        "by_kernel": dict(steady.launches),
        "extra_torch_ops": dict(steady.torch_ops - plain.torch_ops),
        "per_kind": steady.per_kind(),
    }
    report["step"] = {"launches": step_census.n_launches, "by_kernel": dict(step_census.launches)}
    report["hook_host_ms_per_pass"] = round(1e3 * sorted(hook_seconds)[len(hook_seconds) // 2], 3)
    report["specialization_keys"] = sorted(
        {f"{name} {key}" for (name, key) in steady.keys} | {f"{name} {key}" for (name, key)
                                                             in step_census.keys})
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("resnet50", "gpt"), default="resnet50")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", default="meta", help="meta (shapes only) or cpu (interpreter)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--small", action="store_true", help="tiny input sizes (interpreter runs)")
    p.add_argument("--keys", action="store_true", help="include the specialization keys")
    args = p.parse_args(argv)
    report = measure(args.model, args.batch, torch.device(args.device),
                     getattr(torch, args.dtype), args.passes, args.small)
    if not args.keys:
        report.pop("specialization_keys")
    json.dump(report, sys.stdout, indent=1, default=str)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
