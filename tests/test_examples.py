"""The examples in examples/ run as a user would run them, at tiny sizes."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cifar_style_trains_checkpoints_and_resumes(tmp_path, capsys):
    cifar = load("cifar_style")
    tiny = ["--samples", "32", "--batch-size", "8", "--width", "4", "--warmup-steps", "2",
            "--factor-interval", "2", "--device", "cpu"]
    ckpt = tmp_path / "ckpt.pt"
    straight = cifar.main([*tiny, "--epochs", "2"])
    cifar.main([*tiny, "--epochs", "1", "--checkpoint", str(ckpt)])
    assert torch.load(ckpt, weights_only=True)["epoch"] == 0
    resumed = cifar.main([*tiny, "--epochs", "2", "--resume", str(ckpt)])
    assert resumed["epoch"] == straight["epoch"] == 1
    assert math.isfinite(straight["train_loss"])
    assert "test accuracy" in capsys.readouterr().out


def test_amp_compile_example_trains(capsys):
    amp = load("amp_compile")
    try:
        losses = amp.main(["--steps", "12", "--width", "16", "--batch-size", "32",
                           "--compile-backend", "aot_eager", "--device", "cpu"])
    finally:
        # leave dynamo as a fresh process has it: later tests count their own graphs
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    assert all(math.isfinite(v) for v in losses)
    assert "compiled" in capsys.readouterr().out


def test_amp_compile_example_refuses_fp16_on_cpu(capsys):
    amp = load("amp_compile")
    with pytest.raises(SystemExit):
        amp.main(["--device", "cpu", "--dtype", "float16"])
    assert "needs --device cuda" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["cifar_style", "amp_compile"])
def test_examples_run_as_scripts(name):
    out = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--help"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout
