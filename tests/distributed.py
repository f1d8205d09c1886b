"""Run a function on W gloo ranks (CPU), rendezvous through a file: no fixed ports."""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, init_file: str, fn, args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn, world_size: int, tmp_path: Path, *args, timeout: float = 240) -> None:
    """Spawn ``fn(rank, world_size, *args)`` on every rank; raise if any rank fails."""
    context = mp.start_processes(
        _entry, args=(world_size, str(tmp_path / "rendezvous"), fn, args), nprocs=world_size,
        join=False, start_method="spawn",
    )
    while not context.join(timeout=timeout):
        pass
