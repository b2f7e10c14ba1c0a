"""bench/hook_time.py runs and reports paired adafisher/plain ratios (no timing asserts), into
tmp_path only, leaving the thread count as it was."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import hook_time  # noqa: E402


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_tiny_run_writes_paired_ratios(tmp_path, capsys, backend):
    threads = torch.get_num_threads()
    result = hook_time.main(["--rounds", "2", "--warmup-rounds", "1", "--passes", "1",
                             "--blocks", "2", "--threads", "1", "--backend", backend,
                             "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads
    assert result["tracked_layers"] == 5  # 2 × (conv, BatchNorm) + the Linear
    saved = json.loads((tmp_path / "hook_time.json").read_text())
    for phase in ("forward", "backward", "pass"):
        assert saved["adafisher_vs_plain"][phase]["n"] == 2
        assert saved["ms_per_pass"]["adafisher"][phase] > 0
    assert "adafisher/plain" in capsys.readouterr().out


def test_every_layer_of_the_net_is_fed_each_pass():
    """The timed passes are statistics passes: with factor_interval=1 each feeds every layer."""
    net = hook_time.tiny_net(blocks=1)
    from adafisher import AdaFisher

    optimizer = AdaFisher(net, factor_interval=1, backend="torch")
    net(torch.randn(2, 4, 4, 4)).sum().backward()
    (buffers,) = optimizer._buffers.values()
    assert buffers.pending_count.tolist() == [1.0, 1.0, 1.0]


def test_resnet20_run_reports_paired_differences(tmp_path):
    """--model resnet20 (train_step.py's net: 21 conv, 21 BatchNorm, 1 Linear), small batch."""
    result = hook_time.main(["--model", "resnet20", "--batch-size", "2", "--rounds", "2",
                             "--warmup-rounds", "0", "--passes", "1", "--threads", "1",
                             "--out", str(tmp_path)])
    assert result["model"] == "resnet20" and result["input_shape"] == [2, 3, 32, 32]
    assert result["tracked_layers"] == 43
    saved = json.loads((tmp_path / "hook_time.json").read_text())
    for phase in ("forward", "backward", "pass"):
        assert saved["adafisher_minus_plain_ms"][phase]["n"] == 2


@pytest.mark.parametrize(("argv", "message"), [
    (["--batch-size", "4"], "--batch-size applies to --model resnet20"),
    (["--model", "resnet20", "--blocks", "3"], "--blocks applies to --model tiny"),
])
def test_options_of_the_other_model_are_refused(capsys, argv, message):
    with pytest.raises(SystemExit):
        hook_time.main(argv)
    assert message in capsys.readouterr().err
