"""bench/train_step.py runs and reports every optimizer with paired ratios to Adam (no timing
asserts), into tmp_path only."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import adafisher

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import train_step  # noqa: E402


def test_tiny_run_writes_paired_ratios(tmp_path, capsys):
    before = torch.get_num_threads()
    result = train_step.main(
        ["--interval", "2", "--rounds", "2", "--warmup-rounds", "1", "--batch-size", "2",
         "--threads", "1", "--out", str(tmp_path)]
    )
    assert torch.get_num_threads() == before  # pinned for the run only
    assert set(result["ratio_to_adam"]) == {"adam", "adafisher-i1", "adafisher"}
    assert result["ratio_to_adam"]["adam"]["median"] == 1.0
    saved = json.loads((tmp_path / "train_step.json").read_text())
    assert all(len(t) == 2 for t in saved["window_times_s"].values())
    assert "ratio to Adam, paired" in capsys.readouterr().out


def test_each_window_of_the_default_interval_holds_one_statistics_step(tmp_path, monkeypatch):
    """The old benchmark timed single steps and its `adafisher` rows held no statistics step."""
    collecting = []
    real = train_step.AdaFisher.step

    def step(self, *args, **kwargs):
        if self.factor_interval > 1:
            collecting.append(self._factor_step % self.factor_interval == 0)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(train_step.AdaFisher, "step", step)
    train_step.main(["--interval", "3", "--rounds", "2", "--warmup-rounds", "1",
                     "--batch-size", "2", "--threads", "1", "--out", str(tmp_path)])
    windows = [collecting[i : i + 3] for i in range(0, len(collecting), 3)]
    assert len(windows) == 3 and all(w.count(True) == 1 for w in windows)


def test_backend_choice_is_used_and_reported(tmp_path, capsys):
    result = train_step.main(
        ["--interval", "1", "--rounds", "1", "--warmup-rounds", "0", "--batch-size", "2",
         "--threads", "1", "--backend", "torch", "--out", str(tmp_path)]
    )
    assert result["backend_requested"] == "torch" and result["backend"] == "torch"
    assert "AdaFisher backend: torch (requested 'torch')" in capsys.readouterr().out
    result = train_step.main(
        ["--interval", "1", "--rounds", "1", "--warmup-rounds", "0", "--batch-size", "2",
         "--threads", "1", "--out", str(tmp_path)]
    )
    expected = "native" if adafisher.native_available() else "torch"
    assert result["backend_requested"] == "auto" and result["backend"] == expected
    assert f"AdaFisher backend: {expected} (requested 'auto')" in capsys.readouterr().out
