"""Import time of ``adafisher`` against ``import torch`` alone, paired round by round.

Each round starts two fresh interpreters, one running ``import torch`` and one running
``import adafisher`` (which imports torch), in an order alternating between rounds; the
figure is the median of the per-round ratios with its p10–p90 band.

    python bench/import_time.py --rounds 10
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    from bench import common
except ImportError:  # run as `python bench/import_time.py`
    import common

STATEMENTS = {"torch": "import torch", "adafisher": "import adafisher"}


def time_import(statement: str) -> float:
    """Seconds for a fresh interpreter to run ``statement`` (interpreter start included)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True, cwd=common.REPO_ROOT,
                   env=None)
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=common.positive_int, default=10)
    parser.add_argument("--out", type=Path, default=Path("results"),
                        help="writes OUT/import_time.json (default: results)")
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {name: [] for name in STATEMENTS}
    time_import("import torch")  # untimed: bring the files into the page cache
    for i in range(args.rounds):
        names = list(STATEMENTS) if i % 2 == 0 else list(reversed(STATEMENTS))
        for name in names:
            times[name].append(time_import(STATEMENTS[name]))
    ratio = common.paired_ratios(times["adafisher"], times["torch"])
    result = {
        "rounds": args.rounds,
        "seconds": {name: common.spread(t) for name, t in times.items()},
        "ratio_adafisher_to_torch": ratio,
        "times_s": times,
        "python": sys.executable,
    }
    for name, t in result["seconds"].items():
        print(f"import {name:<10} {common.format_spread(t, digits=2, suffix=' s')}")
    print(f"ratio adafisher/torch {common.format_spread(ratio)}  (median of {args.rounds} "
          f"paired rounds, p10–p90)")
    common.write_json(args.out / "import_time.json", result)
    return result


if __name__ == "__main__":
    main()
