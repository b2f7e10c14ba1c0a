"""bench/train_step.py runs and reports every optimizer with ratios to Adam (no timing asserts)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import train_step  # noqa: E402


def test_tiny_run_writes_ratios(tmp_path, capsys):
    result = train_step.main(
        ["--steps", "2", "--warmup", "1", "--batch-size", "2", "--threads", "1",
         "--out", str(tmp_path)]
    )
    assert set(result["ratio_to_adam"]) == {"adam", "adafisher-i1", "adafisher"}
    assert result["ratio_to_adam"]["adam"] == 1.0
    saved = json.loads((tmp_path / "train_step.json").read_text())
    assert all(len(t) == 2 for t in saved["step_times_s"].values())
    assert "ratio to Adam" in capsys.readouterr().out
