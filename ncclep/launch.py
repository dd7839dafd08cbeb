"""Running a per-rank entry point the way every ncclep command line does: under torchrun or
mpirun with their ranks, or by itself, one process per visible GPU (CPU processes with gloo
where there is no GPU)."""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import bootstrap

RankMain = Callable[[Any, "dist.ProcessGroup | None", torch.device], int]
"""``rank_main(args, process_group, device) -> exit code``; must be importable (module level)."""


def _spawned(rank: int, world: int, port: int, rank_main: RankMain, args: Any, gpu: bool) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if gpu:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        device = torch.device("cpu")
    dist.init_process_group(
        "nccl" if gpu else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=600),
        **({"device_id": device} if gpu else {}),
    )
    try:
        code = rank_main(args, dist.group.WORLD, device)
        # Every rank is done with the group before any tears it down: a rank destroying its gloo
        # group while a peer still closes its own has aborted the peer ("terminate called").
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if code:
        raise SystemExit(code)


def launch(rank_main: RankMain, args: Any, nprocs: int | None, what: str) -> int:
    """Run ``rank_main`` on every rank; returns the exit code for this process."""
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on shared hosts
    if bootstrap.launcher() is not None:  # torchrun or mpirun
        gpu = torch.cuda.is_available()
        if gpu:
            torch.cuda.set_device(bootstrap.local_rank() % torch.cuda.device_count())
        pg = bootstrap.init_from_env("nccl" if gpu else "gloo")
        device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
        try:
            code = rank_main(args, pg, device)
            dist.barrier()  # as in _spawned
            return code
        finally:
            dist.destroy_process_group()
    gpu = torch.cuda.is_available() and torch.cuda.device_count() > 0
    world = nprocs or (torch.cuda.device_count() if gpu else 2)
    if gpu and world > torch.cuda.device_count():
        raise SystemExit(f"--nprocs {world} exceeds the {torch.cuda.device_count()} visible GPUs")
    try:
        mp.spawn(_spawned, args=(world, bootstrap.free_port(), rank_main, args, gpu), nprocs=world, join=True)
    except mp.ProcessExitedException as exc:
        print(f"a {what} process failed: {exc}", file=sys.stderr)
        return 1
    return 0
