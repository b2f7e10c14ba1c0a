"""The wheel installs `kernels/` as `adafisher.kernels`: nothing named plain `kernels` lands in
site-packages."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contents(tmp_path):
    pytest.importorskip("setuptools")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "ADAFISHER_BUILD_NATIVE": "0"},  # the wheel's files, not a compile
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("adafisher-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/", 1)[0] for n in names}
    assert top_level == {"adafisher", wheel.name.split("-py")[0] + ".dist-info"}
    assert "adafisher/kernels/fused_step.py" in names
    assert "adafisher/backends/triton_backend.py" in names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
