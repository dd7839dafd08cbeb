"""Where the LL time goes: GPU time of each kernel phase, launches queued behind a sleep kernel so
host gaps do not count. Spawns one process per GPU. ``PHASE_TOKENS=8,128 PHASE_DTYPES=bf16`` pick
the cases; ``PHASE_TRACE=1`` instead records per-block timestamps inside one dispatch kernel."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import ncclep
from ncclep.bench.timing import QUEUE_AHEAD_CYCLES, Mark, time_steps
from ncclep.bench.workloads import Case, case_routing
from ncclep.launch import launch


def _case(tokens: int, use_fp8: bool) -> Case:
    return Case("ll", tokens, 7168, 8, 256, "random", "fp8" if use_fp8 else "bf16")


def _routing(tokens: int, use_fp8: bool, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The bench's LL routing (random, a tenth of the entries masked, none of a token's all)."""
    g = torch.Generator().manual_seed(dist.get_rank())
    idx, w = case_routing(_case(tokens, use_fp8), dist.get_world_size(), g)
    return idx.to(dev), w.to(dev)


PHASES = [
    "dispatch fused",
    "dispatch send",
    "dispatch recv",
    "combine fused",
    "combine send",
    "combine recv",
]


def measure(tokens: int, use_fp8: bool, reps: int = 30) -> dict[str, float]:
    """Each phase's CUDA-event time and kernel time (``ncclep.bench.timing.time_steps``: barrier
    and sleep before every step), this rank's medians."""
    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(dist.get_rank())
    group = ncclep.Group(256, tokens, 7168, mode="ll", backend="cuda")
    x = torch.randn(tokens, 7168, generator=g).to(torch.bfloat16).to(dev)
    idx, w = _routing(tokens, use_fp8, dev)
    y = torch.randn(group.num_local_experts, group.config.ll_rows_per_expert, 7168, device=dev).to(
        torch.bfloat16
    )

    def step(_i: int, mark: Mark) -> None:
        mark()
        d = group.ll_dispatch(x, idx, w, use_fp8=use_fp8)
        mark()
        p = group.ll_dispatch(x, idx, w, use_fp8=use_fp8, send_only=True)
        mark()
        d2 = p.wait()
        mark()
        group.ll_combine(y, d.handle)
        mark()
        c = group.ll_combine(y, d2.handle, send_only=True)
        mark()
        c.wait()
        mark()

    out: dict[str, float] = {}
    for clock in ("event", "kernel"):
        timings = time_steps(step, len(PHASES), warmup=5, iters=reps, device=dev, group=None, clock=clock)
        for name, t in zip(PHASES, timings, strict=True):
            out[f"{name} ({clock})"] = t.median_us
    group.check()
    group.close()
    return out


# The kernel's trace steps (csrc/kernels/ll/ll_params.h, LLTraceStep).
SEND_START, ACKED, ROUTED, SENT, ARRIVED, RECV_START, FLAGS_SEEN, COPIED, LOADED = 0, 1, 2, 3, 4, 6, 7, 8, 9


def trace(tokens: int, use_fp8: bool) -> str:
    """One fused dispatch with per-block timestamps (ncclep/cuda_ll.py's trace buffer): where a
    block's time goes, in µs from the earliest block's start."""
    rank = dist.get_rank()
    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(rank)
    group = ncclep.Group(256, tokens, 7168, mode="ll", backend="cuda")
    x = torch.randn(tokens, 7168, generator=g).to(torch.bfloat16).to(dev)
    idx, w = _routing(tokens, use_fp8, dev)
    blocks = group.config.num_sms or torch.cuda.get_device_properties(dev).multi_processor_count
    for _ in range(10):
        group.ll_dispatch(x, idx, w, use_fp8=use_fp8)
    buf = torch.zeros(blocks, 16, dtype=torch.int64, device=dev)
    group._backend.trace = buf  # type: ignore[union-attr]
    dist.barrier()
    torch.cuda.synchronize()
    torch.cuda._sleep(QUEUE_AHEAD_CYCLES)
    group.ll_dispatch(x, idx, w, use_fp8=use_fp8)
    torch.cuda.synchronize()
    group._backend.trace = None  # type: ignore[union-attr]
    group.close()
    t = buf.cpu().double()
    t0 = t[:, 0][t[:, 0] > 0].min()

    def rel(step: int, rows: torch.Tensor) -> torch.Tensor:
        return (t[rows, step] - t0) / 1e3

    everyone = torch.arange(blocks)
    senders = everyone[:tokens]
    parts = []
    if senders.numel():
        # A sender ranks its first token, then checks the acknowledgements it read at its start.
        for name, step in (("routed", ROUTED), ("acked", ACKED), ("sent", SENT), ("signalled", ARRIVED)):
            since = (t[senders, step] - t[senders, SEND_START]) / 1e3
            parts.append(f"{name} {since.median():.1f}")
        parts.append(f"slowest sender signalled at {rel(ARRIVED, senders).max():.1f}")
    # Only the last block counts the totals (and sends the counts after its acknowledgements).
    counter = blocks - 1
    counted, acked = ((t[counter, step] - t[counter, SEND_START]) / 1e3 for step in (LOADED, ACKED))
    parts.append(f"counts block: counted {counted:.1f}, acked {acked:.1f}")
    # Blocks that sent a token and left the receive to the others (few tokens) stamp no receive step.
    receivers = everyone[t[:, RECV_START] > 0]
    parts.append(f"receive started (median block) at {rel(RECV_START, receivers).median():.1f}")
    parts.append(f"counts seen (median block) at {rel(FLAGS_SEEN, receivers).median():.1f}")
    parts.append(f"copies done (last block) at {rel(COPIED, receivers).max():.1f}")
    return f"rank {rank} {'fp8' if use_fp8 else 'bf16'} tokens={tokens}: " + "; ".join(parts)


def run(_args: object, _pg: object, _device: torch.device) -> int:
    """Per-rank entry point for ``ncclep.launch`` (spawned per GPU, or under torchrun / mpirun)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dtypes = [d == "fp8" for d in os.environ.get("PHASE_DTYPES", "bf16,fp8").split(",")]
    if os.environ.get("PHASE_TRACE"):
        for use_fp8 in dtypes:
            for tokens in [int(t) for t in os.environ.get("PHASE_TOKENS", "1,8,128").split(",")]:
                lines: list = [None] * world
                dist.all_gather_object(lines, trace(tokens, use_fp8))
                if rank == 0:
                    print("\n".join(lines), flush=True)
        return 0
    sizes = [int(t) for t in os.environ.get("PHASE_TOKENS", "1,8,32,128,256").split(",")]
    for use_fp8 in dtypes:
        for tokens in sizes:
            med = measure(tokens, use_fp8)
            meds: list = [None] * world
            dist.all_gather_object(meds, med)
            if rank == 0:
                worst = {n: max(m[n] for m in meds) for n in med}
                cells = "  ".join(f"{n} {v:7.1f}" for n, v in worst.items())
                print(f"{'fp8 ' if use_fp8 else 'bf16'} tokens={tokens:4d}  {cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(launch(run, None, None, "phase timing"))
