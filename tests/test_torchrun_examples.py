"""The torchrun recipes in examples/ run as documented, at tiny sizes, on CPU (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def torchrun(nproc: int, script: str, *args: str) -> str:
    # the child processes' own thread setting; this process's environment stays as it is
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", str(EXAMPLES / script), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_ddp_example_runs_on_two_ranks():
    out = torchrun(2, "ddp_torchrun.py", "--steps", "3", "--batch", "4", "--width", "8",
                   "--factor-interval", "2")
    assert "done: 2 ranks" in out and "step 2 loss" in out


def test_fsdp2_example_checkpoints_on_two_ranks_and_resumes_on_one(tmp_path):
    tiny = ["--steps", "3", "--batch", "4", "--width", "8", "--factor-interval", "2"]
    checkpoint = str(tmp_path / "ckpt")
    out = torchrun(2, "fsdp2_torchrun.py", *tiny, "--checkpoint", checkpoint)
    assert "done: 2 ranks" in out
    out = torchrun(1, "fsdp2_torchrun.py", *tiny, "--checkpoint", checkpoint, "--resume",
                   "--bf16")
    assert "done: 1 ranks" in out and "step 2 loss" in out
