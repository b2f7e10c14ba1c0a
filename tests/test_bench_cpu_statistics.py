"""bench/cpu_statistics.py runs and reports paired avx2/baseline ratios (no timing asserts),
into tmp_path only, leaving the ISA and the thread count as they were."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import adafisher

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import cpu_statistics  # noqa: E402


@pytest.mark.skipif(not adafisher.native_available(), reason="adafisher._C is not built")
def test_tiny_run_writes_paired_ratios(tmp_path, capsys):
    from adafisher import _C

    if "avx2" not in _C.cpu_isas():
        pytest.skip("this CPU lacks AVX2/FMA (or the build is not x86-64 GCC/Clang): the bench "
                    "has nothing to compare")
    threads, isa = torch.get_num_threads(), _C.cpu_isa()
    result = cpu_statistics.main(["--rounds", "2", "--threads", "1", "--batch", "2",
                                  "--sample-seconds", "0.001", "--dtypes", "float32,bfloat16",
                                  "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads and _C.cpu_isa() == isa
    assert len(result["cases"]) == 2 * 2 * len(cpu_statistics.SHAPES)
    saved = json.loads((tmp_path / "cpu_statistics.json").read_text())
    case = saved["cases"]["conv_input_statistic 2x16x32x32 float32"]
    assert len(case["seconds"]["avx2"]) == 2 and "median" in case["avx2_vs_baseline"]
    assert "avx2/baseline" in capsys.readouterr().out


def test_unknown_dtype_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        cpu_statistics.main(["--dtypes", "float8", "--out", str(tmp_path)])
