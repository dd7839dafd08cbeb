"""One rank's side of the benchmark: build inputs, run each case on each backend, time it."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .. import _native, fp8
from ..errors import NcclepError
from ..group import Group
from .check import check_case
from .timing import Measured, Timing, measure_steps, slowest, slowest_kernels, time_graph_replays
from .workloads import Case, case_routing

OPS = ("dispatch", "combine", "pair")
FIGURES = ("kernel", "event", "graph", "host")
HOST_OVERRAN_WARN = 0.1  # of the samples: the host figure then includes waits for the GPU


@dataclass
class Settings:
    backends: list[str]
    warmup: int
    iters: int
    sets: int
    validate: bool
    graph: bool
    seed: int = 0
    queue_ahead: bool = True
    sms: list[int] | None = None
    """HT kernels' SM counts to sweep (a group per value); None: the library's default."""
    profile: bool = True
    """Kernel time from the torch profiler (GPUs only)."""


@dataclass
class Row:
    """One op of one case on one group: every figure is the slowest rank's (None: not measured)."""

    case: dict[str, Any]
    backend: str
    op: str  # "dispatch", "combine" or "pair" (dispatch then combine)
    bytes: float
    nvl_bytes: float
    buffer_bytes: int
    sms: int | None
    validated: str
    kernel: Timing | None = None
    event: Timing | None = None
    graph: Timing | None = None
    host: Timing | None = None
    kernels: dict[str, float] = field(default_factory=dict)
    backend_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Inputs:
    x: torch.Tensor
    x_scales: torch.Tensor | None
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    expert_out: torch.Tensor | None = None


def make_inputs(case: Case, rank: int, world: int, settings: Settings, device: torch.device) -> list[Inputs]:
    sets = []
    for s in range(settings.sets):
        g = torch.Generator().manual_seed(settings.seed * 1_000_003 + rank * 1009 + s)
        x = torch.randn(case.tokens, case.hidden, generator=g).to(torch.bfloat16)
        idx, w = case_routing(case, world, g)
        scales = None
        if case.mode == "ht" and case.dtype == "fp8":
            x, scales = fp8.quantize(x)
            scales = scales.to(device)
        sets.append(Inputs(x.to(device), scales, idx.to(device), w.to(device)))
    return sets


def row_bytes(case: Case) -> float:
    """Bytes of one dispatched row as DeepEP's tests count them: bf16 ``hidden * 2``; fp8 LL
    ``hidden + hidden / 128 * 4 + 16`` (payload, scales, 16 bytes of metadata); fp8 HT
    ``hidden * (1 + 4 / 128)`` (payload and scales)."""
    if case.dtype != "fp8":
        return case.hidden * 2
    scales = case.hidden // fp8.BLOCK * 4
    return case.hidden + scales + (16 if case.mode == "ll" else 0)


def traffic(case: Case, inputs: list[Inputs], rank: int, world: int) -> dict[str, float]:
    """This rank's bytes per call, averaged over the input sets (before averaging over ranks).

    LL: valid selections (entries not -1) of this rank's tokens × :func:`row_bytes` for the
    dispatch, × ``hidden * 2`` for the combine. HT: rows this rank sends (one per token and
    destination rank, its own included) × the same row sizes; averaged over the ranks this equals
    DeepEP's rows received incl. the own rank. ``*_nvl``: the part to other ranks (one message per
    token and destination rank in both modes), the bytes that cross NVLink.
    """
    if case.experts % world:
        raise ValueError(f"num_experts ({case.experts}) must be divisible by the world size ({world})")
    local = case.experts // world
    selections = sent_rows = remote_rows = 0.0
    for inp in inputs:
        idx = inp.topk_idx.cpu()
        valid = idx >= 0
        selections += float(valid.sum())
        dest = torch.zeros(idx.shape[0], world, dtype=torch.bool)
        rows = torch.arange(idx.shape[0]).unsqueeze(1).expand_as(idx)
        dest[rows[valid], idx[valid] // local] = True
        sent_rows += float(dest.sum())
        remote_rows += float(dest.sum() - dest[:, rank].sum())
    n = len(inputs)
    row, back = row_bytes(case), case.hidden * 2
    sent = selections if case.mode == "ll" else sent_rows
    return {
        "dispatch": sent / n * row,
        "combine": sent / n * back,
        "dispatch_nvl": remote_rows / n * row,
        "combine_nvl": remote_rows / n * back,
    }


def _mean_over_ranks(value: float, pg: dist.ProcessGroup | None) -> float:
    world: list[Any] = [None] * dist.get_world_size(pg)
    dist.all_gather_object(world, value, group=pg)
    return sum(world) / len(world)


def make_group(case: Case, backend: str, pg: dist.ProcessGroup | None, sms: int | None) -> Group | str:
    """The case's group, or why it cannot be made."""
    try:
        return Group(
            case.experts,
            case.tokens,
            case.hidden,
            mode=case.mode,
            process_group=pg,
            max_topk=min(max(case.topk, 8), case.experts),
            num_sms=sms,
            backend=backend,
        )
    except (NcclepError, ValueError) as exc:
        return str(exc)


def _steps(group: Group, case: Case, inputs: list[Inputs]):  # type: ignore[no-untyped-def]
    """The timed step (dispatch then combine) and, per input set, the ops to capture in graphs:
    dispatch, combine, and both in one graph."""
    fp8_dispatch = case.dtype == "fp8"
    if case.mode == "ll":
        for inp in inputs:
            inp.expert_out = torch.randn(
                group.num_local_experts, group.config.ll_rows_per_expert, case.hidden, device=inp.x.device
            ).to(torch.bfloat16)

        def step(i: int, mark) -> None:  # type: ignore[no-untyped-def]
            inp = inputs[i % len(inputs)]
            mark()
            out = group.ll_dispatch(inp.x, inp.topk_idx, inp.topk_weights, use_fp8=fp8_dispatch)
            mark()
            group.ll_combine(inp.expert_out, out.handle)
            mark()

        def graph_ops(inp: Inputs):  # type: ignore[no-untyped-def]
            def dispatch() -> Any:
                return group.ll_dispatch(inp.x, inp.topk_idx, inp.topk_weights, use_fp8=fp8_dispatch)

            handle = dispatch().handle

            def pair() -> Any:
                return group.ll_combine(inp.expert_out, dispatch().handle)

            return dispatch, lambda: group.ll_combine(inp.expert_out, handle), pair

        return step, graph_ops

    rows = group.config.ht_num_rows(case.topk, "flat", 1)
    for inp in inputs:
        inp.expert_out = torch.randn(rows, case.hidden, device=inp.x.device).to(torch.bfloat16)

    def ht_step(i: int, mark) -> None:  # type: ignore[no-untyped-def]
        inp = inputs[i % len(inputs)]
        mark()
        out = group.ht_dispatch(inp.x, inp.topk_idx, inp.topk_weights, x_scales=inp.x_scales)
        mark()
        group.ht_combine(inp.expert_out, out.handle)
        mark()

    def ht_graph_ops(inp: Inputs):  # type: ignore[no-untyped-def]
        # The default worst-case output shapes make both ops capturable.
        def dispatch() -> Any:
            return group.ht_dispatch(inp.x, inp.topk_idx, inp.topk_weights, x_scales=inp.x_scales)

        handle = dispatch().handle
        return dispatch, lambda: group.ht_combine(inp.expert_out, handle), None

    return ht_step, ht_graph_ops


def _measure(
    group: Group,
    case: Case,
    inputs: list[Inputs],
    settings: Settings,
    pg: dist.ProcessGroup | None,
    device: torch.device,
    progress: Any,
) -> dict[str, Any]:
    """This rank's figures: {figure: [dispatch, combine, pair] timings}, kernel breakdowns, notes."""
    step, graph_ops = _steps(group, case, inputs)
    how: dict[str, Any] = {"warmup": settings.warmup, "iters": settings.iters, "device": device, "group": pg}
    gpu = device.type == "cuda"
    figures: dict[str, list[Timing | None]] = {f: [None, None, None] for f in FIGURES}
    kernels: list[dict[str, float]] = [{}, {}, {}]
    notes: dict[str, Any] = {}

    def keep(figure: str, measured: Measured) -> None:
        figures[figure] = [*measured.phases, measured.total]

    if gpu:
        keep("event", measure_steps(step, 2, clock="event", queue_ahead=settings.queue_ahead, **how))
        if settings.profile:
            measured = measure_steps(step, 2, clock="kernel", queue_ahead=settings.queue_ahead, **how)
            if measured.total.median_us > 0:
                keep("kernel", measured)
                pair: dict[str, float] = {}
                for per_op in measured.kernels:
                    for name, us in per_op.items():
                        pair[name] = pair.get(name, 0.0) + us
                kernels = [*measured.kernels, pair]
            else:
                progress("    the profiler linked no device time to the ops: no kernel time")
    # The reference backend waits for the GPU inside its calls (host syncs): behind the sleep its
    # host time would include the sleep, so it is timed from a drained queue (the call's wall time).
    host_queue_ahead = settings.queue_ahead and group.backend != "reference"
    measured = measure_steps(step, 2, clock="host", queue_ahead=host_queue_ahead, **how)
    keep("host", measured)
    if gpu and not host_queue_ahead:
        notes["host_queue"] = "drained"
    elif gpu and measured.host_overran > HOST_OVERRAN_WARN * settings.iters:
        notes["host_overran"] = measured.host_overran
        progress(
            f"    host time: in {measured.host_overran} of {settings.iters} calls the GPU had finished the "
            "sleep before the host returned (host work > ~1 ms, or the call waits for the GPU)"
        )
    if settings.graph and gpu and group.backend != "reference":
        ops = [graph_ops(inp) for inp in inputs]
        for k in range(3):
            captures = [o[k] for o in ops]
            if captures[0] is not None:
                figures["graph"][k] = time_graph_replays(captures, queue_ahead=settings.queue_ahead, **how)
        del ops
    return {"figures": figures, "kernels": kernels, "notes": notes}


def _device_error(group: Group, pg: dist.ProcessGroup | None) -> str | None:
    """What a kernel of the group reported on any rank (a timed-out wait, bad input), or None."""
    try:
        group.check()
        mine = None
    except NcclepError as exc:
        mine = f"rank {group.rank}: {exc}"
    every: list[Any] = [None] * dist.get_world_size(pg)
    dist.all_gather_object(every, mine, group=pg)
    return next((e for e in every if e is not None), None)


def run_case(
    case: Case,
    settings: Settings,
    pg: dist.ProcessGroup | None,
    device: torch.device,
    progress: Any,
) -> tuple[list[Row], list[dict[str, Any]]]:
    """The case's rows on every backend (and SM count), and what served it: one entry per group
    asked for, with the backend that served it and why (``Group.backend_reason``, or the error
    that kept the group from being made)."""
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    inputs = make_inputs(case, rank, world, settings, device)
    volume = {k: _mean_over_ranks(v, pg) for k, v in traffic(case, inputs, rank, world).items()}
    volume["pair"] = volume["dispatch"] + volume["combine"]
    volume["pair_nvl"] = volume["dispatch_nvl"] + volume["combine_nvl"]
    rows: list[Row] = []
    served: list[dict[str, Any]] = []
    for backend in settings.backends:
        if backend == "cuda" and not _native.has_kernels(case.mode):
            continue
        sweep: list[int | None] = [None]
        if backend == "cuda" and case.mode == "ht" and settings.sms:
            sweep = list(settings.sms)
        for sms in sweep:
            asked = {"mode": case.mode, "requested": backend, "num_sms": sms}
            made = make_group(case, backend, pg, sms)
            if isinstance(made, str):
                progress(f"  skipped backend {backend}: {made}")
                served.append({**asked, "backend": None, "reason": made})
                continue
            with made as group:
                reason = getattr(group, "backend_reason", None)
                reason = None if reason is None else str(reason)
                served.append({**asked, "backend": group.backend, "reason": reason})
                validated = check_case(group, case, inputs[0]) if settings.validate else "not asked"
                if validated.startswith("FAILED"):
                    print(f"[rank {rank}] {case.label()} {backend}: {validated}", file=sys.stderr)
                mine = _measure(group, case, inputs, settings, pg, device, progress)
                problem = _device_error(group, pg)
                if problem is not None:
                    validated = f"FAILED: {problem}"
                    print(f"[rank {rank}] {case.label()} {backend}: {validated}", file=sys.stderr)
                for k, op in enumerate(OPS):
                    figures = {f: slowest(mine["figures"][f][k], pg) for f in FIGURES}
                    rows.append(
                        Row(
                            case=case.as_dict(),
                            backend=group.backend,
                            op=op,
                            bytes=volume[op],
                            nvl_bytes=volume[f"{op}_nvl"],
                            buffer_bytes=group.buffer_bytes,
                            sms=group.kernel_sms,
                            validated=validated,
                            kernels=slowest_kernels(mine["kernels"][k], pg),
                            backend_reason=reason,
                            extra=dict(mine["notes"]),
                            **figures,
                        )
                    )
    return rows, served
