"""bench/step.py and bench/factors.py run end to end on CPU (tiny sizes) and write their JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, out: Path, *extra: str, interpret: bool = False,
         json_flag: bool = False) -> dict:
    """Run a bench script; ``json_flag``: name the output file as bench/gpu_check.sh does."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    target = out / "named.json" if json_flag else out / script.replace(".py", ".json")
    where = ["--json", str(target)] if json_flag else ["--out", str(out)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--cpu-dry-run", *where, *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(target.read_text())


def test_step_bench_dry_run(tmp_path: Path) -> None:
    report = _run("step.py", tmp_path)
    assert report["dry_run"] is True and report["copy_gbs"] > 0
    for set_name in ("resnet50", "transformer"):
        opts = report["sets"][set_name]["optimizers"]
        assert set(opts) == {"adamw_fused", "adafisher", "adafisherw"}
        for result in opts.values():
            assert result["device_ms"] > 0 and result["gbs"] > 0
        assert opts["adamw_fused"]["time_vs_adamw_fused"] == 1.0
        # one momentum buffer instead of two, plus small factor buffers
        assert 0.45 < opts["adafisher"]["memory_vs_adamw_fused"] < 0.7
    assert len(report["rows"]) == 6 and {"set", "optimizer", "gbs"} <= set(report["rows"][0])


def test_step_bench_triton_interpreted(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    report = _run("step.py", tmp_path, "--backend", "triton", "--sets", "transformer",
                  "--optimizers", "adafisherw", "--repeats", "1", interpret=True)
    assert report["sets"]["transformer"]["optimizers"]["adafisherw"]["backend"] == "triton"


def test_factors_bench_dry_run(tmp_path: Path) -> None:
    report = _run("factors.py", tmp_path, "--backend", "torch", json_flag=True)
    network = report["conv"]["network"]
    assert {"nchw/h_torch", "channels_last/h_torch", "nchw/s_torch"} <= set(network)
    assert sum(row["count"] for row in report["conv"]["layers"]) == 2 * 53  # two layouts
    assert [row["case"] for row in report["dense"]][:2] == ["linear_h", "linear_s"]
    assert {row["set"] for row in report["blend"]} == {"resnet50", "transformer"}
    assert report["rows"][0]["case"] == "resnet50 conv H (nchw)"


def test_bench_rejects_bad_arguments(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "step.py"), "--cpu-dry-run", "--sets", "vgg",
         "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "unknown" in proc.stderr
