"""`import adafisher` stays light: torch._dynamo is loaded only when something compiles.

The time itself is a benchmark figure (bench/import_time.py), never asserted here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import import_time  # noqa: E402


def test_import_does_not_load_dynamo():
    code = "import sys, adafisher; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300)
    assert out.stdout.strip() == "False"


def test_import_time_bench_reports_a_paired_ratio(tmp_path, monkeypatch, capsys):
    fake = iter([0.5, 1.0, 1.1, 1.2, 1.0])  # warm-up, then (torch, adafisher), (adafisher, torch)
    monkeypatch.setattr(import_time, "time_import", lambda statement: next(fake))
    result = import_time.main(["--rounds", "2", "--out", str(tmp_path)])
    assert result["times_s"] == {"torch": [1.0, 1.0], "adafisher": [1.1, 1.2]}
    assert result["ratio_adafisher_to_torch"]["median"] == 1.15
    assert (tmp_path / "import_time.json").exists()
    assert "ratio adafisher/torch" in capsys.readouterr().out
