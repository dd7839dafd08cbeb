"""``python -m ncclep.bench`` / ``ncclep-bench``: the LL and HT workloads of docs/benchmarking.md.

Started by itself it spawns one process per visible GPU (or, with no GPU, a few CPU processes
running the reference backend at small sizes, and says so); under ``torchrun`` or ``mpirun`` it
uses their ranks. Every backend available runs in the same process group, the reference included.

Figures per op (dispatch, combine, and the pair dispatch+combine), each the slowest rank's median:
kernel (device time of the op's kernels, torch profiler), event (CUDA events around the eager
call), graph (replay of the op captured in a CUDA graph; LL pair: both ops in one graph) and host
(CPU time of the eager call). On CPU processes only the host figure exists.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import _native, bootstrap
from ..config import GroupConfig
from ..launch import launch
from . import report
from .runner import Row, Settings, run_case
from .workloads import default_cases

CPU_NOTICE = (
    "no GPU found: running the reference backend on {n} CPU processes (gloo) at small sizes; "
    "these are CPU timings, not comparable with GPU figures"
)
PLOT_MISSING = "--plot needs matplotlib: pip install 'ncclep[plot]' (or pip install matplotlib)"


def _csv_ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ncclep.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--mode", choices=("ll", "ht", "all"), default="all")
    p.add_argument("--dtype", choices=("bf16", "fp8", "all"), default="all", help="dispatch payload")
    p.add_argument("--tokens", type=_csv_ints, help="tokens per rank, e.g. 8,128 (default: every row)")
    p.add_argument("--hidden", type=int)
    p.add_argument("--topk", type=int)
    p.add_argument("--experts", type=int)
    p.add_argument("--routing", choices=("random", "uniform", "skewed", "hot"), action="append")
    p.add_argument("--full", action="store_true", help="also hidden 2048/4096, top-k 4/16 and skewed/hot")
    p.add_argument("--backend", choices=("all", "reference", "cuda"), default="all")
    p.add_argument(
        "--sms",
        type=_csv_ints,
        help="HT kernels' SM counts to sweep, e.g. 8,16,24: a group per value, rows labelled with SMs "
        "(default: the library's, 24)",
    )
    p.add_argument("--warmup", type=int, help="untimed calls before each measurement (default 20 on GPUs)")
    p.add_argument("--iters", type=int, help="timed calls per measurement (default 100 on GPUs)")
    p.add_argument("--sets", type=int, default=4, help="input sets rotated between calls")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
    p.add_argument("--no-profile", action="store_true", help="skip the kernel time (torch profiler)")
    p.add_argument(
        "--drained-queue",
        action="store_true",
        help="time each step right after the barrier, host launch work included (default: queued "
        "behind a ~1 ms sleep kernel so the events time the ops on the GPU)",
    )
    p.add_argument("--validate", action="store_true", help="check results against the reference")
    p.add_argument("--nprocs", type=int, help="processes when started by itself")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for the JSON and plot")
    p.add_argument("--json", help="JSON path (default OUT/results.json; '-': stdout, the table to stderr)")
    p.add_argument("--plot", nargs="?", const=True, default=None, help="write a PNG (default OUT/plot.png)")
    p.add_argument(
        "--replot",
        type=Path,
        metavar="RESULTS_JSON",
        help="run nothing: print the header and table of an earlier run's JSON (and --plot it)",
    )
    p.add_argument("--seed", type=int, default=0)
    return p


def _world(args: argparse.Namespace) -> tuple[int, bool, str | None]:
    """(processes the run will have, whether they use GPUs, an error about --nprocs or None)."""
    gpu = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if bootstrap.launcher() is not None:
        for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
            if os.environ.get(var, "").isdigit():
                return int(os.environ[var]), gpu, None
        return 1, gpu, None
    visible = torch.cuda.device_count() if gpu else 0
    if gpu and args.nprocs is not None and args.nprocs > visible:
        return args.nprocs, gpu, f"--nprocs {args.nprocs} exceeds the {visible} visible GPUs"
    return args.nprocs or (torch.cuda.device_count() if gpu else 2), gpu, None


def _case_problem(case: Any, world: int) -> str | None:
    """Why the case cannot run on ``world`` ranks (the group's own checks, and the routing's)."""
    try:
        GroupConfig(
            num_experts=case.experts,
            max_tokens_per_rank=case.tokens,
            hidden=case.hidden,
            mode=case.mode,
            world_size=world,
            max_topk=min(max(case.topk, 8), case.experts),
        )
    except ValueError as exc:
        return str(exc)
    if case.topk > case.experts:
        return f"top-k ({case.topk}) exceeds the number of experts ({case.experts})"
    if case.dtype == "fp8" and case.hidden % 128:
        return f"fp8 payloads need hidden divisible by 128, got {case.hidden}"
    if case.routing == "hot" and case.topk > case.experts // world:
        return f"hot routing needs top-k ({case.topk}) <= experts per rank ({case.experts // world})"
    return None


def _cases(args: argparse.Namespace, modes: list[str], dtypes: list[str], gpu: bool) -> list[Any]:
    """The run's cases from the arguments (the same list for the checks and the run)."""
    return default_cases(
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


def check_args(args: argparse.Namespace, world: int, gpu: bool) -> str | None:
    """The first problem with the arguments taken together, for ``world`` processes, or None:
    found before any process is spawned."""
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        return PLOT_MISSING
    if args.replot is not None:
        return None if args.replot.is_file() else f"--replot: no file {args.replot}"
    if args.nprocs is not None and args.nprocs < 1:
        return "--nprocs must be at least 1"
    for name, least in (("iters", 1), ("warmup", 0), ("sets", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            return f"--{name} must be at least {least}, got {value}"
    if args.tokens is not None and (not args.tokens or min(args.tokens) < 1):
        return "--tokens must be positive integers"
    if args.sms is not None:
        if not args.sms or min(args.sms) < 1:
            return "--sms must be positive integers"
        if args.mode == "ll":
            return "--sms sweeps the HT kernels' SMs: it needs --mode ht or all"
        if args.backend == "reference":
            return "--sms sweeps the HT kernels' SMs: the reference backend has none"
    if args.backend == "cuda" and not gpu:
        return "--backend cuda needs CUDA GPUs (none visible)"
    modes = ["ll", "ht"] if args.mode == "all" else [args.mode]
    dtypes = ["bf16", "fp8"] if args.dtype == "all" else [args.dtype]
    cases = _cases(args, modes, dtypes, gpu)
    for case in cases:
        problem = _case_problem(case, world)
        if problem is not None:
            return f"{problem} (case {case.label()}, {world} processes)"
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    world, gpu, problem = _world(args)
    problem = problem or check_args(args, world, gpu)
    if problem is not None:
        p.error(problem)
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


def _progress_line(r: Row) -> str:
    cells = []
    for figure in ("kernel", "event", "graph", "host"):
        t = getattr(r, figure)
        if t is not None:
            cells.append(f"{figure} {t.median_us:9.1f}")
    sms = f" {r.sms} SMs" if r.sms else ""
    line = f"    {r.backend:>9}{sms} {r.op:<8} " + "  ".join(cells) + f"  us  check: {r.validated}"
    if r.kernels and r.backend != "reference" and r.op != "pair":
        line += "\n" + " " * 14 + "  ".join(f"{name} {us:.1f}" for name, us in r.kernels.items())
    return line


def render(doc: dict[str, Any], args: argparse.Namespace) -> None:
    """Header and table (stdout, or stderr when the JSON goes to stdout), JSON, plot: all from
    ``doc``, the JSON document of one run."""
    to_stdout = args.json == "-"
    stream = sys.stderr if to_stdout else sys.stdout
    print(report.header(doc), file=stream)
    print(report.table(doc["rows"]), file=stream, flush=True)
    if args.replot is None:
        json_path = args.json or args.out / "results.json"
        report.write_json(doc, json_path)
        if not to_stdout:
            print(f"wrote {json_path}", file=sys.stderr)
    if args.plot:
        plot_path = args.out / "plot.png" if args.plot is True else Path(args.plot)
        report.plot(doc, plot_path)
        print(f"wrote {plot_path}", file=sys.stderr)


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
        sms=args.sms,
        profile=not args.no_profile,
    )
    cases = _cases(args, modes, dtypes, gpu)
    rows: list[Row] = []
    served: list[dict[str, Any]] = []
    for i, case in enumerate(cases, 1):
        say(f"[{i}/{len(cases)}] {case.label()}")
        new, groups = run_case(case, settings, pg, device, say)
        for r in new:
            say(_progress_line(r))
        rows += new
        served += [g for g in groups if g not in served]
    failed = any(r.validated.startswith("FAILED") for r in rows)
    if rank == 0:
        meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "world_size": world,
            "device": torch.cuda.get_device_name(device) if gpu else "CPU",
            "gpu": gpu,
            "torch": torch.__version__,
            **(_native.nccl_versions() if gpu else {"nccl": None}),
            "host": platform.node(),
            "settings": asdict(settings),
            "virtual_nodes": os.environ.get("NCCLEP_VIRTUAL_NODES"),
            "backends": served,
            "note": None if gpu else CPU_NOTICE.format(n=world),
        }
        render(report.document(rows, meta), args)
        if failed:
            print("validation FAILED (see the check column)", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot is not None:
        render(report.read_json(args.replot), args)
        return 0
    return launch(run_rank, args, args.nprocs, "benchmark")


if __name__ == "__main__":
    sys.exit(main())
