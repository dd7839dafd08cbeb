"""Where the LL time goes: GPU time of each kernel phase, launches queued behind a sleep kernel so
host gaps do not count. Run on each rank, e.g. ``torchrun --nproc-per-node 2 bench/ll_phases.py``
or by itself (spawns one process per GPU)."""

from __future__ import annotations

import os
import statistics
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ncclep
from ncclep.bootstrap import free_port
from ncclep.workloads import make_routing

SLEEP_CYCLES = 2_000_000  # ~1 ms at 1.98 GHz: every launch below is queued before it ends


def measure(tokens: int, use_fp8: bool, reps: int = 30) -> dict[str, float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(rank)
    group = ncclep.Group(256, max(tokens, 1), 7168, mode="ll", backend="cuda")
    x = torch.randn(tokens, 7168, generator=g).to(torch.bfloat16).to(dev)
    idx, w = make_routing("random", tokens, 256, 8, world_size=world, generator=g, masked=10)
    idx, w = idx.to(dev), w.to(dev)
    y = torch.randn(group.num_local_experts, group.config.ll_rows_per_expert, 7168, device=dev).to(
        torch.bfloat16
    )
    names = [
        "dispatch fused",
        "dispatch send",
        "dispatch recv",
        "combine fused",
        "combine send",
        "combine recv",
    ]
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i in range(reps + 5):
        dist.barrier()
        torch.cuda.synchronize()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(9)]
        torch.cuda._sleep(SLEEP_CYCLES)
        ev[0].record()
        d = group.ll_dispatch(x, idx, w, use_fp8=use_fp8)
        ev[1].record()
        p = group.ll_dispatch(x, idx, w, use_fp8=use_fp8, send_only=True)
        ev[2].record()
        d2 = p.wait()
        ev[3].record()
        group.ll_combine(y, d.handle)
        ev[4].record()
        c = group.ll_combine(y, d2.handle, send_only=True)
        ev[5].record()
        c.wait()
        ev[6].record()
        torch.cuda.synchronize()
        if i >= 5:
            for k, n in enumerate(names):
                samples[n].append(ev[k].elapsed_time(ev[k + 1]) * 1e3)
    group.check()
    group.close()
    return {n: statistics.median(v) for n, v in samples.items()}


def run(rank: int, world: int, port: int) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        device_id=torch.device("cuda", rank),
    )
    dtypes = [d == "fp8" for d in os.environ.get("PHASE_DTYPES", "bf16,fp8").split(",")]
    sizes = [int(t) for t in os.environ.get("PHASE_TOKENS", "1,8,32,128,256").split(",")]
    for use_fp8 in dtypes:
        for tokens in sizes:
            med = measure(tokens, use_fp8)
            meds: list = [None] * world
            dist.all_gather_object(meds, med)
            if rank == 0:
                worst = {n: max(m[n] for m in meds) for n in med}
                cells = "  ".join(f"{n} {v:7.1f}" for n, v in worst.items())
                blocks = os.environ.get("NCCLEP_LL_SEND_BLOCKS", "all")
                print(
                    f"send_blocks={blocks} {'fp8 ' if use_fp8 else 'bf16'} tokens={tokens:4d}  {cells}",
                    flush=True,
                )
    dist.destroy_process_group()


if __name__ == "__main__":
    n = torch.cuda.device_count()
    mp.spawn(run, args=(n, free_port()), nprocs=n)
    sys.exit(0)
