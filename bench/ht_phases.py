"""Where the HT time goes: GPU time of each kernel of a dispatch and a combine (torch profiler),
and of the whole ops (CUDA events, kernel time, host time), with every launch queued behind a
sleep kernel so host gaps do not count: the figures of ``python -m ncclep.bench`` (the same
code), per kernel. Spawns one process per GPU.

Environment: ``PHASE_TOKENS=512,4096`` and ``PHASE_DTYPES=bf16,fp8`` pick the cases,
``PHASE_SMS=24,32`` the group's SM budgets, ``PHASE_SPLITS=12:16,16:16`` the (dispatch, combine)
send-block counts to sweep (``-`` keeps the library's default split).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from ncclep.bench.runner import Settings, run_case
from ncclep.bench.workloads import Case
from ncclep.launch import launch

HIDDEN, EXPERTS, TOPK = 7168, 256, 8


def measure(tokens: int, use_fp8: bool, sms: int, reps: int = 30) -> dict[str, float]:
    """The bench's figures of one HT case on the CUDA backend (``ncclep.bench.runner.run_case``:
    barrier + sleep before every step, slowest rank's medians): each op's event and kernel time,
    and each kernel's device time."""
    device = torch.device("cuda", torch.cuda.current_device())
    case = Case("ht", tokens, HIDDEN, TOPK, EXPERTS, "uniform", "fp8" if use_fp8 else "bf16")
    settings = Settings(
        backends=["cuda"], warmup=5, iters=reps, sets=4, validate=False, graph=False, sms=[sms]
    )
    rows, served = run_case(case, settings, None, device, lambda _message: None)
    if not rows:
        raise SystemExit(f"no CUDA group for {case.label()}: {served}")
    result: dict[str, float] = {}
    for r in rows:
        if r.op == "pair":
            continue
        for figure in ("event", "kernel", "host"):
            t = getattr(r, figure)
            if t is not None:
                result[f"[{r.op}] {figure}"] = t.median_us
        result.update({f"{r.op}: {name}": us for name, us in r.kernels.items()})
    return result


def run(_args: object, _pg: object, _device: torch.device) -> int:
    """Per-rank entry point for ``ncclep.launch`` (spawned per GPU, or under torchrun / mpirun)."""
    rank = dist.get_rank()
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
                    worst = measure(tokens, use_fp8, sms)  # the slowest rank's already
                    if rank == 0:
                        cells = "  ".join(f"{n} {v:.1f}" for n, v in worst.items())
                        label = f"{'fp8 ' if use_fp8 else 'bf16'} tokens={tokens} sms={sms} split={split}"
                        print(f"{label}  {cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(launch(run, None, None, "phase timing"))
