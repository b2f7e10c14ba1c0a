"""Helpers shared by the benchmark scripts: argument types, devices, timing, environment, JSON."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def ensure_repo_on_path() -> None:
    """Make the checkout's `adafisher` importable when a script is run as `python bench/X.py`.

    Why: Python then puts bench/ (not the repo root) on sys.path, so an uninstalled checkout
    would not find its own package.
    """
    root = str(REPO_ROOT)
    if root not in sys.path:
        sys.path.insert(1, root)


# ---------------------------------------------------------------- argparse value types
def _int_at_least(low: int, what: str):
    """An argparse type: an int ≥ ``low``, with argparse's error otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


positive_int = _int_at_least(1, "a positive integer")
nonnegative_int = _int_at_least(0, "an integer >= 0")


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def unit_float(text: str) -> float:
    """A number in [0, 1) such as a momentum coefficient or a label-smoothing amount."""
    value = _finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


# ---------------------------------------------------------------- devices and timing
def resolve_device(spec: str) -> torch.device:
    """'auto' -> cuda when present, else cpu. Raises ValueError with a readable message."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"unknown device {spec!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {spec!r} (use auto, cpu, cuda or cuda:N)")
    return device


def add_gpu_check_options(p: argparse.ArgumentParser, json_name: str, dry_run: str) -> None:
    """The options bench/gpu_check.sh passes to every kernel benchmark."""
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda[:N]")
    p.add_argument("--out", type=Path, default=Path("results"), help=f"writes OUT/{json_name}")
    p.add_argument("--json", type=Path, default=None,
                   help="write the JSON to this file instead (bench/gpu_check.sh uses it)")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help=f"{dry_run} on CPU: checks the script, measures nothing real")


def device_or_error(parser: argparse.ArgumentParser, spec: str) -> torch.device:
    """``resolve_device`` for a parsed option: a bad device ends in ``parser.error``."""
    try:
        return resolve_device(spec)
    except ValueError as exc:
        parser.error(str(exc))


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock readings cover it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """A wall-clock reading taken after all queued work on `device` has finished."""
    synchronize(device)
    return time.perf_counter()


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


# ---------------------------------------------------------------- environment and output
def import_adafisher() -> ModuleType:
    """Import the optimizer package lazily (Adam-only runs do not need it)."""
    ensure_repo_on_path()
    try:
        return importlib.import_module("adafisher")
    except ImportError as exc:
        raise ImportError(f"the adafisher package is not importable ({exc})") from exc


def env_info(device: torch.device) -> dict[str, Any]:
    """What a reader needs to interpret a timing: versions, threads, hardware."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    try:
        info["adafisher"] = getattr(import_adafisher(), "__version__", "unknown")
    except ImportError:
        info["adafisher"] = None
    return info


class _NoBar:
    """Stands in for tqdm where it is not installed (e.g. a bare GPU machine)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass


def progress(total: int, desc: str, unit: str, disable: bool = False) -> Any:
    """A tqdm progress bar on stderr (a silent stand-in when tqdm is missing)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr)


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (also readable as plain text)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ---------------------------------------------------------------- paired timings
def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0 ≤ q ≤ 1) by linear interpolation between order statistics."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("quantile of no values")
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median and p10–p90 of ``values``."""
    return {"median": quantile(values, 0.5), "p10": quantile(values, 0.1),
            "p90": quantile(values, 0.9), "n": len(values)}


# A paired ratio whose p10–p90 band is wider than this fraction of its median says the rounds
# disagree (load from other processes came and went): the figure is flagged as untrustworthy.
TRUSTED_RELATIVE_SPREAD = 0.25


def paired_ratios(times: Sequence[float], reference: Sequence[float]) -> dict[str, Any]:
    """Per-round ratios ``times[i] / reference[i]`` (both timed in the same round), summarized
    as median and p10–p90, with ``trusted`` False when the band is too wide to rely on.

    Why per round: a ratio of whole-run medians mixes rounds that saw different load; a
    ratio inside one round compares runs that saw the same load.
    """
    if len(times) != len(reference) or not times:
        raise ValueError(f"need equal, non-zero numbers of rounds, got {len(times)} "
                         f"and {len(reference)}")
    summary = spread([t / r for t, r in zip(times, reference)])
    width = (summary["p90"] - summary["p10"]) / summary["median"]
    summary["relative_spread"] = width
    summary["trusted"] = width <= TRUSTED_RELATIVE_SPREAD
    return summary


def format_spread(summary: dict[str, Any], scale: float = 1.0, digits: int = 2,
                  suffix: str = "") -> str:
    """``1.23x (1.10–1.40)``: median with its p10–p90 band, ``!`` when untrusted."""
    text = (f"{summary['median'] * scale:.{digits}f}{suffix} "
            f"({summary['p10'] * scale:.{digits}f}–{summary['p90'] * scale:.{digits}f})")
    return text if summary.get("trusted", True) else text + " !"


@contextlib.contextmanager
def pinned_threads(threads: int | None) -> Iterator[None]:
    """Run with torch's intra-op pool pinned to ``threads`` (None: leave it), then restore it.

    Why restore: a benchmark's ``main`` also runs inside the test process.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
