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
from ..workloads import make_routing
from .check import check_case
from .timing import Timing, slowest, time_graph_replays, time_steps
from .workloads import Case

LL_MASKED = 10


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


@dataclass
class Row:
    case: dict[str, Any]
    backend: str
    op: str
    median_us: float
    p90_us: float
    bytes: float
    nvl_bytes: float
    graph_median_us: float | None
    buffer_bytes: int
    sms: int | None
    validated: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.bytes / self.median_us / 1e3

    @property
    def nvl_gbps(self) -> float:
        return self.nvl_bytes / self.median_us / 1e3


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
        idx, w = make_routing(
            case.routing,
            case.tokens,
            case.experts,
            case.topk,
            world_size=world,
            generator=g,
            masked=LL_MASKED if case.mode == "ll" and case.routing == "random" else 0,
        )
        scales = None
        if case.mode == "ht" and case.dtype == "fp8":
            x, scales = fp8.quantize(x)
            scales = scales.to(device)
        sets.append(Inputs(x.to(device), scales, idx.to(device), w.to(device)))
    return sets


def _row_bytes(case: Case) -> float:
    if case.dtype == "fp8":
        return case.hidden + case.hidden // fp8.BLOCK * 4
    return case.hidden * 2


def traffic(case: Case, inputs: list[Inputs], rank: int, world: int) -> dict[str, float]:
    """Bytes per rank, averaged over the input sets, as BENCHMARKS.md counts them."""
    local = case.experts // world
    selections = sent_rows = remote_rows = 0.0
    for inp in inputs:
        idx = inp.topk_idx
        valid = idx >= 0
        selections += float(valid.sum())
        dest = torch.zeros(idx.shape[0], world, dtype=torch.bool, device=idx.device)
        rows = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1).expand_as(idx)
        dest[rows[valid], (idx[valid] // local)] = True
        sent_rows += float(dest.sum())
        remote_rows += float(dest.sum() - dest[:, rank].sum())
    n = len(inputs)
    row = _row_bytes(case)
    if case.mode == "ll":
        return {
            "dispatch": selections / n * row,
            "combine": selections / n * case.hidden * 2,
            "dispatch_nvl": remote_rows / n * row,
            "combine_nvl": remote_rows / n * case.hidden * 2,
        }
    return {
        "dispatch": sent_rows / n * row,
        "combine": sent_rows / n * case.hidden * 2,
        "dispatch_nvl": remote_rows / n * row,
        "combine_nvl": remote_rows / n * case.hidden * 2,
    }


def _mean_over_ranks(value: float, pg: dist.ProcessGroup | None) -> float:
    world: list[Any] = [None] * dist.get_world_size(pg)
    dist.all_gather_object(world, value, group=pg)
    return sum(world) / len(world)


def _make_group(case: Case, backend: str, pg: dist.ProcessGroup | None) -> Group | str:
    try:
        return Group(
            case.experts,
            case.tokens,
            case.hidden,
            mode=case.mode,
            process_group=pg,
            max_topk=max(case.topk, 8),
            backend=backend,
        )
    except NcclepError as exc:
        return str(exc)


def _steps(group: Group, case: Case, inputs: list[Inputs]):  # type: ignore[no-untyped-def]
    """The timed step (dispatch then combine) and the ops to capture in graphs."""
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
            return dispatch, lambda: group.ll_combine(inp.expert_out, handle)

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
        return dispatch, lambda: group.ht_combine(inp.expert_out, handle)

    return ht_step, ht_graph_ops


def run_case(
    case: Case,
    settings: Settings,
    pg: dist.ProcessGroup | None,
    device: torch.device,
    progress: Any,
) -> list[Row]:
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    inputs = make_inputs(case, rank, world, settings, device)
    volume = {k: _mean_over_ranks(v, pg) for k, v in traffic(case, inputs, rank, world).items()}
    rows: list[Row] = []
    for backend in settings.backends:
        if backend == "cuda" and not _native.has_kernels(case.mode):
            continue
        made = _make_group(case, backend, pg)
        if isinstance(made, str):
            progress(f"  skipped backend {backend}: {made}")
            continue
        with made as group:
            validated = check_case(group, case, inputs[0]) if settings.validate else "not asked"
            if validated.startswith("FAILED"):
                print(f"[rank {rank}] {case.label()} {backend}: {validated}", file=sys.stderr)
            step, graph_ops = _steps(group, case, inputs)
            how: dict[str, Any] = {
                "warmup": settings.warmup,
                "iters": settings.iters,
                "device": device,
                "group": pg,
                "queue_ahead": settings.queue_ahead,
            }
            timings = time_steps(step, 2, **how)
            graphs: list[Timing | None] = [None, None]
            if (
                settings.graph
                and graph_ops is not None
                and group.backend != "reference"
                and device.type == "cuda"
            ):
                for k, op in enumerate(graph_ops(inputs[0])):
                    graphs[k] = time_graph_replays(op, **how)
            for k, op_name in enumerate(("dispatch", "combine")):
                worst = slowest(timings[k], pg)
                graph = slowest(graphs[k], pg)
                assert worst is not None
                rows.append(
                    Row(
                        case=case.as_dict(),
                        backend=group.backend,
                        op=op_name,
                        median_us=worst.median_us,
                        p90_us=worst.p90_us,
                        bytes=volume[op_name],
                        nvl_bytes=volume[f"{op_name}_nvl"],
                        graph_median_us=None if graph is None else graph.median_us,
                        buffer_bytes=group.buffer_bytes,
                        sms=group.kernel_sms,
                        validated=validated,
                    )
                )
    return rows
