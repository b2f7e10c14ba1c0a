"""bench/comm.py: the GPT-sized all-reduce figure, counted independently (no ranks spawned;
the measured per-step collectives are the bench's job, the one-all-reduce rule is tested in
test_fsdp.py and test_distributed.py through trajectories)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `bench` is a folder of scripts at the repository root

from bench import comm  # noqa: E402


def test_gpt_statistics_all_reduce_size():
    tied, untracked = comm.gpt_figures()
    width, depth, vocab = 1024, 24, 50257
    # per block: qkv, attn proj, mlp fc, mlp proj (H with bias entry + S), two LayerNorms
    block = ((width + 1 + 3 * width) + (width + 1 + width) + (width + 1 + 4 * width)
             + (4 * width + 1 + width) + 2 * (2 + width))
    layers = depth * 6 + 1  # + ln_f
    floats = depth * block + (2 + width) + layers
    assert untracked["tracked_layers"] == layers
    assert untracked["statistics_all_reduce_bytes"] == 4 * floats
    head = width + vocab  # the tied LM head: a Linear without bias
    assert tied["statistics_all_reduce_bytes"] == 4 * (floats + head + 1)
    assert 350e6 < tied["parameters"] < 360e6
    assert tied["fp32_gradient_bytes"] == 4 * tied["parameters"]
