"""``python -m ncclep.bench`` / ``ncclep-bench``: the LL and HT workloads of BENCHMARKS.md.

Started by itself it spawns one process per visible GPU (or, with no GPU, a few CPU processes
running the reference backend at small sizes, and says so); under ``torchrun`` or ``mpirun`` it
uses their ranks. Every backend available runs in the same process group, the reference included.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import _native
from ..launch import launch
from . import report
from .runner import Row, Settings, run_case
from .workloads import default_cases

CPU_NOTICE = (
    "no GPU found: running the reference backend on {n} CPU processes (gloo) at small sizes; "
    "these are CPU timings, not comparable with the GPU figures of BENCHMARKS.md"
)


def _csv_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ncclep.bench", description=__doc__)
    p.add_argument("--mode", choices=("ll", "ht", "all"), default="all")
    p.add_argument("--dtype", choices=("bf16", "fp8", "all"), default="all", help="dispatch payload")
    p.add_argument("--tokens", type=_csv_ints, help="tokens per rank, e.g. 8,128 (default: BENCHMARKS.md)")
    p.add_argument("--hidden", type=int)
    p.add_argument("--topk", type=int)
    p.add_argument("--experts", type=int)
    p.add_argument("--routing", choices=("random", "uniform", "skewed", "hot"), action="append")
    p.add_argument("--full", action="store_true", help="also hidden 2048/4096, top-k 4/16 and skewed/hot")
    p.add_argument("--backend", choices=("all", "reference", "cuda"), default="all")
    p.add_argument("--warmup", type=int)
    p.add_argument("--iters", type=int)
    p.add_argument("--sets", type=int, default=4, help="input sets rotated between calls")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
    p.add_argument(
        "--drained-queue",
        action="store_true",
        help="time each step right after the barrier, host launch work included (default: queued "
        "behind a ~1 ms sleep kernel so the events time the ops on the GPU)",
    )
    p.add_argument("--validate", action="store_true", help="check results against the reference")
    p.add_argument("--nprocs", type=int, help="processes when started by itself")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for the JSON and plot")
    p.add_argument("--json", type=Path, help="JSON path (default OUT/results.json)")
    p.add_argument("--plot", nargs="?", const=True, default=None, help="write a PNG (default OUT/plot.png)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.nprocs is not None and args.nprocs < 1:
        p.error("--nprocs must be at least 1")
    return args


def _backends(args: argparse.Namespace, modes: list[str], gpu: bool, say: Any) -> list[str]:
    """Backends to run; a case whose mode has no CUDA kernels runs the reference only."""
    if args.backend == "reference":
        return ["reference"]
    with_kernels = [m for m in modes if gpu and _native.has_kernels(m)]
    without = [m for m in modes if m not in with_kernels]
    if without:
        if not gpu:
            why = "no GPU"
        elif not _native.available():
            why = f"the CUDA extension is not built ({_native.IMPORT_ERROR})"
        else:
            why = "this build has no kernels for " + ", ".join(without)
        if args.backend == "cuda" and not with_kernels:
            raise SystemExit(f"--backend cuda is not available: {why}")
        say(f"ncclep CUDA backend not available for {', '.join(without)} ({why}): reference only there")
    if not with_kernels:
        return ["reference"]
    return ["cuda"] if args.backend == "cuda" else ["cuda", "reference"]


def run_rank(args: argparse.Namespace, pg: dist.ProcessGroup | None, device: torch.device) -> int:
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    gpu = device.type == "cuda"

    def say(message: str) -> None:
        if rank == 0:
            print(message, file=sys.stderr, flush=True)

    if not gpu:
        say(CPU_NOTICE.format(n=world))
    modes = ["ll", "ht"] if args.mode == "all" else [args.mode]
    dtypes = ["bf16", "fp8"] if args.dtype == "all" else [args.dtype]
    settings = Settings(
        backends=_backends(args, modes, gpu, say),
        warmup=args.warmup if args.warmup is not None else (20 if gpu else 3),
        iters=args.iters if args.iters is not None else (100 if gpu else 10),
        sets=args.sets,
        validate=args.validate,
        graph=not args.no_graph,
        seed=args.seed,
        queue_ahead=not args.drained_queue,
    )
    cases = default_cases(
        modes,
        dtypes,
        gpu=gpu,
        full=args.full,
        tokens=args.tokens,
        hidden=args.hidden,
        topk=args.topk,
        experts=args.experts,
        routings=args.routing,
    )
    rows: list[Row] = []
    for i, case in enumerate(cases, 1):
        say(f"[{i}/{len(cases)}] {case.label()}")
        new = run_case(case, settings, pg, device, say)
        for r in new:
            say(
                f"    {r.backend:>9} {r.op:<8} {r.median_us:10.1f} us  {r.gbps:7.1f} GB/s"
                f"  check: {r.validated}"
            )
        rows += new
    failed = any(r.validated.startswith("FAILED") for r in rows)
    if rank == 0:
        meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "world_size": world,
            "device": torch.cuda.get_device_name(device) if gpu else "CPU",
            "gpu": gpu,
            "torch": torch.__version__,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if gpu else None,
            "host": platform.node(),
            "settings": vars(settings),
            "virtual_nodes": os.environ.get("NCCLEP_VIRTUAL_NODES"),
            "note": None if gpu else CPU_NOTICE.format(n=world),
        }
        print(report.table(rows), flush=True)
        json_path = args.json or args.out / "results.json"
        report.to_json(rows, meta, json_path)
        print(f"wrote {json_path}", file=sys.stderr)
        if args.plot:
            plot_path = args.out / "plot.png" if args.plot is True else Path(args.plot)
            title = f"ncclep on {world}x {meta['device']}"
            report.plot(rows, plot_path, title)
            print(f"wrote {plot_path}", file=sys.stderr)
        if failed:
            print("validation FAILED (see the check column)", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return launch(run_rank, args, args.nprocs, "benchmark")


if __name__ == "__main__":
    sys.exit(main())
