"""bench/gpu_check.sh and bench/summarize.py without a GPU: option handling and the summary."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `bench` is a folder of scripts at the repository root

from bench import summarize  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def fake_imagenet_report(step_ms: float, peak_gib: float, interval: int) -> dict:
    return {
        "config": {"optimizer": "x", "factor_interval": interval, "batch_size": 256,
                   "arch": "resnet50"},
        "epochs": [{"epoch_s": 12.5}],
        "peak_gpu_memory_gib": peak_gib,
        "timing": {"images_per_s": 256_000 / step_ms, "step_ms_median": step_ms,
                   "step_ms_amortized": step_ms, "step_ms_median_stats": None,
                   "step_ms_median_plain": step_ms, "opt_step_ms_median": 3.0,
                   "timed_steps": 100},
    }


def write(path: Path, payload: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def test_summary_computes_ratios_and_targets(tmp_path: Path, capsys):
    write(tmp_path / "imagenet_adamw.json", fake_imagenet_report(100.0, 20.0, 100))
    write(tmp_path / "imagenet_adafisher-i1.json", fake_imagenet_report(112.0, 19.0, 1))
    write(tmp_path / "imagenet_adafisher.json", fake_imagenet_report(101.0, 19.5, 100))
    write(tmp_path / "stages" / "tests.json", {"order": 2, "name": "tests", "rc": 1,
                                               "seconds": 3.0, "timed_out": False})
    write(tmp_path / "stages" / "step.json", {"order": 1, "name": "step", "rc": None,
                                              "seconds": 0, "skipped": "not present"})
    write(tmp_path / "factors.json", {"rows": [{"layer": "conv1", "us": 12.5}]})
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="t" name="a"/><testcase classname="t" name="b"><failure/>'
        '</testcase><testcase classname="t" name="c"><skipped/></testcase>'
        "</testsuite></testsuites>")

    summary = summarize.main([str(tmp_path)])
    figures = summary["imagenet"]
    assert figures["adafisher-i1"]["step_time_ratio"] == pytest.approx(1.12)
    assert figures["adafisher"]["peak_memory_ratio"] == pytest.approx(0.975)
    results = {c["target"]: c["ok"] for c in summary["targets"]}
    assert results["adafisher-i1 step time <= 1.10x adamw"] is False
    assert results["adafisher step time <= 1.03x adamw"] is True
    assert summary["tests"]["passed"] == 1 and summary["tests"]["failed_ids"] == ["t::b"]
    assert [s["name"] for s in summary["stages"]] == ["step", "tests"]

    text = capsys.readouterr().out
    assert (tmp_path / "gpu_check.md").read_text().strip() == text.strip()
    assert "FAIL" in text and "skipped (not present)" in text and "conv1" in text
    assert "FAILED (rc 1)" in text
    assert json.loads((tmp_path / "gpu_check.json").read_text())["targets"] == summary["targets"]


def test_summary_of_an_empty_folder_says_what_is_missing(tmp_path: Path, capsys):
    summary = summarize.main([str(tmp_path)])
    assert summary["imagenet"] == {} and summary["tests"] is None
    assert all(c["ok"] is None for c in summary["targets"])
    assert "no figures" in capsys.readouterr().out


def test_gpu_check_rejects_unknown_options_and_has_help():
    script = REPO / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    bad = subprocess.run(["bash", str(script), "--gpu"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option --gpu" in bad.stderr
    helped = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--cpu-dry-run" in helped.stdout
