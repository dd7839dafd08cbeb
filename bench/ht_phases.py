"""Where the HT time goes: GPU time of each kernel of a dispatch and a combine (torch profiler),
and of the whole ops (CUDA events), with every launch queued behind a sleep kernel so host gaps
do not count. Spawns one process per GPU.

Environment: ``PHASE_TOKENS=512,4096`` and ``PHASE_DTYPES=bf16,fp8`` pick the cases,
``PHASE_SMS=24,32`` the group's SM budgets, ``PHASE_SPLITS=12:16,16:16`` the (dispatch, combine)
send-block counts to sweep (``-`` keeps the library's default split).
"""

from __future__ import annotations

import os
import statistics
import sys
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

import ncclep
from ncclep import fp8
from ncclep.bench.timing import QUEUE_AHEAD_CYCLES
from ncclep.launch import launch
from ncclep.workloads import make_routing

HIDDEN, EXPERTS, TOPK = 7168, 256, 8


def _queue_behind_sleep(token: torch.Tensor) -> None:
    # The all-reduce on the stream lines the ranks' GPUs up (host barriers leave tens of µs of skew).
    torch.cuda.synchronize()
    dist.all_reduce(token)
    torch.cuda._sleep(QUEUE_AHEAD_CYCLES)


def measure(tokens: int, use_fp8: bool, sms: int, reps: int = 30) -> dict[str, float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(rank)
    group = ncclep.Group(EXPERTS, tokens, HIDDEN, mode="ht", num_sms=sms, backend="cuda")
    x = torch.randn(tokens, HIDDEN, generator=g).to(torch.bfloat16).to(dev)
    scales = None
    if use_fp8:
        x, scales = fp8.quantize(x)
    idx, w = make_routing("uniform", tokens, EXPERTS, TOPK, world_size=world, generator=g)
    idx, w = idx.to(dev), w.to(dev)
    rows = group.config.ht_num_rows(TOPK, "flat", 1)
    y = torch.randn(rows, HIDDEN, generator=g).to(torch.bfloat16).to(dev)

    def step() -> None:
        out = group.ht_dispatch(x, idx, w, x_scales=scales)
        group.ht_combine(y, out.handle)

    token = torch.zeros(1, device=dev)
    times: dict[str, list[float]] = {"dispatch": [], "combine": []}
    for i in range(reps + 5):
        _queue_behind_sleep(token)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        ev[0].record()
        out = group.ht_dispatch(x, idx, w, x_scales=scales)
        ev[1].record()
        group.ht_combine(y, out.handle)
        ev[2].record()
        torch.cuda.synchronize()
        if i >= 5:
            times["dispatch"].append(ev[0].elapsed_time(ev[1]) * 1e3)
            times["combine"].append(ev[1].elapsed_time(ev[2]) * 1e3)
    result = {f"[{k}]": statistics.median(v) for k, v in times.items()}

    kernels: dict[str, list[float]] = defaultdict(list)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            _queue_behind_sleep(token)
            step()
            torch.cuda.synchronize()
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            if "ncclep" not in evt.name and "Memset" not in evt.name:
                continue  # the barrier's all-reduce, the sleep
            name = evt.name.replace("(anonymous namespace)::", "").split("(")[0]
            name = name.removeprefix("void ").removeprefix("ncclep::")
            kernels[name].append(evt.device_time)
    for name, v in kernels.items():
        result[name] = statistics.median(v)
    group.check()
    group.close()
    return result


def run(_args: object, _pg: object, _device: torch.device) -> int:
    """Per-rank entry point for ``ncclep.launch`` (spawned per GPU, or under torchrun / mpirun)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dtypes = [d == "fp8" for d in os.environ.get("PHASE_DTYPES", "bf16,fp8").split(",")]
    sizes = [int(t) for t in os.environ.get("PHASE_TOKENS", "512,4096").split(",")]
    sms_list = [int(s) for s in os.environ.get("PHASE_SMS", "24").split(",")]
    splits = os.environ.get("PHASE_SPLITS", "-").split(",")
    for split in splits:
        if split != "-":
            d, c = split.split(":")
            os.environ["NCCLEP_HT_DISPATCH_SEND_BLOCKS"], os.environ["NCCLEP_HT_COMBINE_SEND_BLOCKS"] = d, c
        for sms in sms_list:
            for use_fp8 in dtypes:
                for tokens in sizes:
                    med = measure(tokens, use_fp8, sms)
                    meds: list = [None] * world
                    dist.all_gather_object(meds, med)
                    if rank == 0:
                        names = sorted({n for m in meds for n in m})
                        worst = {n: max(m.get(n, 0.0) for m in meds) for n in names}
                        cells = "  ".join(f"{n} {v:.1f}" for n, v in worst.items())
                        label = f"{'fp8 ' if use_fp8 else 'bf16'} tokens={tokens} sms={sms} split={split}"
                        print(f"{label}  {cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(launch(run, None, None, "phase timing"))
