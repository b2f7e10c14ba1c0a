"""Shared scaffolding for multi-rank tests: gloo ranks on CPU, spawned as processes, each with
a watchdog so a hung collective fails the test instead of stalling the suite."""

from __future__ import annotations

import faulthandler
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WATCHDOG_S = 240


def _run_rank(rank: int, world: int, init_file: str, worker: Callable, args: tuple) -> None:
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    torch.set_num_threads(1)  # this child's own setting: ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        worker(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_ranks(worker: Callable, world: int, tmp_path: Path, *args) -> None:
    """Run ``worker(rank, world, *args)`` in ``world`` gloo ranks; ``worker`` must be a
    module-level function (the ranks import it) and release DDP/FSDP objects before returning
    (destroying a process group under a live DDP hung its destructor now and then)."""
    init_file = tmp_path / "dist_init"
    mp.spawn(_run_rank, args=(world, str(init_file), worker, args), nprocs=world, join=True)
