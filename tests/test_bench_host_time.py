"""bench/host_time.py runs end to end (a few rounds) and writes its JSON; its stub of the ops
is undone afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adafisher

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `bench` is a folder of scripts at the repository root

from bench.host_time import stubbed_ops  # noqa: E402

pytestmark = pytest.mark.skipif(not adafisher.native_available(), reason="adafisher._C not built")


def test_host_time_quick_run_writes_its_figures(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "host_time.py"), "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "host_time.json").read_text())
    assert result["parameters"] == {"resnet50": 161, "resnet50x2": 322}
    for model in ("resnet50", "resnet50x2"):
        for variant in ("native_stubbed", "native_meta"):
            ms = result[model][variant]["ms"]
            assert 0 < ms["p10"] <= ms["median"] <= ms["p90"]
    assert "ratio_vs_resnet50" in result["resnet50x2"]["native_stubbed"]


def test_stubbed_ops_are_restored():
    original = torch.ops.adafisher.fused_step
    with stubbed_ops():
        assert torch.ops.adafisher.fused_step is not original
    assert torch.ops.adafisher.fused_step is original
