"""The harness driver: on each rank of a process group, ncclep's vLLM prepare/finalize classes run
MoE layers through vLLM's calls and are compared with the same MoE computed densely.

:func:`run_rank` (every rank, e.g. through ``tests/dist_pool.py``) builds the groups through
ncclep's all2all managers with ``NCCLEP_VLLM_BACKEND=backend`` ("reference" on CPU, "cuda" on
GPUs), then for each :data:`CASES` entry constructs the class as ``maybe_make_prepare_finalize``
would, runs random inputs (one rank may have no tokens) through :class:`~.vllm_calls.KernelCalls`
twice, and compares with :func:`~.experts.dense_moe`. With ``graph_replays`` (CUDA only) it also
captures an LL forward (prepare, experts, finalize) in a CUDA graph, as vLLM captures decode, and
checks replays on fresh inputs. It returns the measured errors and every problem found instead of
raising, so that all ranks finish each collective.

Where vLLM is not installed, its names are stand-ins (:mod:`.stand_ins`); where it is, the real
ones run, except that cases needing vLLM's CUDA ops (its fp8 group quantisation and ``moe_sum``)
are skipped on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ncclep.bench.timing import capture_graph

from .experts import ExpertWeights, dense_moe
from .stand_ins import ensure_vllm

ITERATIONS = 2  # each case runs twice through the same objects (handles are reused)
# max |out - expected| <= TOLERANCE * max |expected|, and the same bound on the relative norm
# error: bf16 results of fp32 sums in other orders;
# fp8 also allows vLLM's group quantisation to land one fp8 step from ncclep's on a few values.
TOLERANCE = {"bf16": 2**-6, "fp8": 2**-5, "fp8-ue8m0": 2**-5}


@dataclass(frozen=True)
class Sizes:
    experts: int = 8
    hidden: int = 512  # packed UE8M0 scales need hidden/128 divisible by 4
    ffn: int = 64
    ll_max_tokens: int = 8
    ht_max_tokens: int = 24


@dataclass(frozen=True)
class Case:
    name: str
    mode: str  # "ll" (batched format) or "ht" (standard format)
    quant: str = "bf16"  # "fp8": [128, 128] block quantisation; "fp8-ue8m0": LL packed UE8M0 scales
    calls: str = "async"  # "async": vLLM's path (prepare_async, finalize_async); "sync": prepare, finalize
    routing: str = "random"  # "hot": every token to the last rank's experts
    topk: int = 2
    weight_on_input: bool = False  # apply_router_weight_on_input (top-1, as Llama 4)
    empty_rank: int | None = None  # this rank passes no tokens
    reduce: str = "delegate"  # HT experts: "delegate", "contiguous" or "noop" (see HarnessExperts)
    eplb: bool = False  # LL: EPLB routing tables (a global -> physical permutation)


CASES = [
    Case("ll-bf16", "ll"),
    Case("ll-bf16-sync-empty", "ll", calls="sync", empty_rank=0),
    Case("ll-bf16-hot-empty", "ll", routing="hot", empty_rank=1),
    Case("ll-bf16-top1-weight-on-input", "ll", topk=1, weight_on_input=True),
    Case("ll-bf16-eplb", "ll", topk=4, eplb=True),
    Case("ll-fp8", "ll", quant="fp8"),
    Case("ll-fp8-sync-empty", "ll", quant="fp8", calls="sync", empty_rank=1),
    Case("ll-fp8-ue8m0", "ll", quant="fp8-ue8m0", topk=3),
    Case("ht-bf16", "ht"),
    Case("ht-bf16-sync-empty", "ht", calls="sync", empty_rank=0),
    Case("ht-bf16-hot-noop", "ht", routing="hot", reduce="noop", topk=3),
    Case("ht-bf16-contiguous-empty", "ht", reduce="contiguous", empty_rank=1),
    Case("ht-bf16-top1-weight-on-input", "ht", topk=1, weight_on_input=True),
    Case("ht-fp8", "ht", quant="fp8"),
    Case("ht-fp8-noop-empty", "ht", quant="fp8", reduce="noop", empty_rank=1, calls="sync"),
]
GRAPH_QUANTS = ("bf16", "fp8")


@dataclass
class Rank:
    """What every case on this rank shares."""

    backend: str
    sizes: Sizes
    rank: int
    world: int
    device: torch.device
    weights: ExpertWeights
    managers: dict[str, Any]
    vllm: str
    problems: list[str] = field(default_factory=list)

    @property
    def local(self) -> slice:
        n = self.sizes.experts // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def max_tokens(self, mode: str) -> int:
        return self.sizes.ll_max_tokens if mode == "ll" else self.sizes.ht_max_tokens

    def expert_map(self) -> torch.Tensor:
        """vLLM's expert map: global id -> local index, -1 for other ranks' experts (int32)."""
        emap = torch.full((self.sizes.experts,), -1, dtype=torch.int32)
        emap[self.local] = torch.arange(self.local.stop - self.local.start, dtype=torch.int32)
        return emap.to(self.device)


def needs_vllm_cuda_ops(case: Case) -> bool:
    return (case.mode == "ht" and case.quant == "fp8") or case.reduce == "contiguous"


def inputs(ctx: Rank, case: Case, seed: int, tokens: int | None = None) -> tuple[torch.Tensor, ...]:
    """``x [B, H]`` bf16, ``topk_ids [B, K]`` int64 (distinct experts), ``topk_weights [B, K]`` fp32."""
    g = torch.Generator().manual_seed(seed * 1009 + ctx.rank)
    if tokens is None:
        most = ctx.max_tokens(case.mode)
        tokens = 0 if ctx.rank == case.empty_rank else int(torch.randint(1, most + 1, (1,), generator=g))
    experts = ctx.sizes.experts
    x = torch.randn(tokens, ctx.sizes.hidden, generator=g) * (torch.rand(tokens, 1, generator=g) * 2 + 0.25)
    if case.routing == "hot":
        local = experts // ctx.world
        ids = torch.rand(tokens, local, generator=g).argsort(dim=1)[:, : case.topk] + experts - local
    else:
        ids = torch.rand(tokens, experts, generator=g).argsort(dim=1)[:, : case.topk]
    if case.weight_on_input:
        w = torch.rand(tokens, case.topk, generator=g) * 0.5 + 0.5
    else:
        w = torch.softmax(torch.randn(tokens, case.topk, generator=g), dim=-1)
    return x.to(torch.bfloat16).to(ctx.device), ids.to(ctx.device), w.float().to(ctx.device)


def routing_tables(ctx: Rank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EPLB's (global_to_physical, physical_to_global, local_expert_global_ids), same on every rank."""
    g2p = torch.randperm(ctx.sizes.experts, generator=torch.Generator().manual_seed(77))
    p2g = torch.argsort(g2p)
    return g2p.to(ctx.device), p2g.to(ctx.device), p2g[ctx.local].to(ctx.device)


def compare(
    out: torch.Tensor, expected: torch.Tensor, quant: str, what: str
) -> tuple[dict[str, float], str | None]:
    if out.shape != expected.shape or out.dtype != torch.bfloat16:
        return {}, f"{what}: output {tuple(out.shape)} {out.dtype}, expected {tuple(expected.shape)} bf16"
    if expected.numel() == 0:
        return {"max_err": 0.0, "scale": 0.0}, None
    diff = out.float() - expected
    err = float(diff.abs().max()) if bool(torch.isfinite(out).all()) else float("inf")
    scale = float(expected.abs().max())
    metrics = {"max_err": err, "scale": scale, "rel": float(diff.norm() / expected.norm().clamp_min(1e-30))}
    tol = TOLERANCE[quant]
    if not (err <= tol * scale + 1e-6 and metrics["rel"] <= tol):
        return metrics, (
            f"{what}: max |out - expected| = {err:.4g}, max |expected| = {scale:.4g}, "
            f"relative norm error {metrics['rel']:.3g} (tolerance {tol:.3g})"
        )
    return metrics, None


def build(ctx: Rank, case: Case, calls: Any) -> tuple[Any, Any, tuple[torch.Tensor, ...] | None]:
    """The prepare/finalize (as maybe_make_prepare_finalize), the kernel calls around it, the EPLB tables."""
    tables = routing_tables(ctx) if case.eplb else None
    quant = calls.quant_config(case.quant)
    pf = calls.make_prepare_finalize(
        case.mode,
        ctx.managers[case.mode],
        ctx.sizes.experts,
        ctx.sizes.hidden,
        ctx.max_tokens(case.mode),
        max(c.topk for c in CASES),
        quant,
        tables,
    )
    if pf.group.backend != ctx.backend:
        ctx.problems.append(f"{case.name}: group backend {pf.group.backend}, wanted {ctx.backend}")
    experts = calls.HarnessExperts(
        case.mode, ctx.weights, ctx.local, quant, packed_ue8m0=case.quant == "fp8-ue8m0", reduce=case.reduce
    )
    return pf, calls.KernelCalls(pf, experts, use_async=case.calls == "async"), tables


def expected(
    ctx: Rank, case: Case, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, tables: Any
) -> torch.Tensor:
    physical = ids if tables is None else tables[0][ids]
    return dense_moe(ctx.weights, x, physical, w, case.weight_on_input, case.quant)


def run_case(ctx: Rank, case: Case, index: int, calls: Any) -> dict[str, float]:
    _, kernel, tables = build(ctx, case, calls)
    worst: dict[str, float] = {}
    for it in range(ITERATIONS):
        x, ids, w = inputs(ctx, case, seed=100 * index + it)
        out = kernel.apply(x, w, ids, ctx.sizes.experts, ctx.expert_map(), case.weight_on_input)
        metrics, problem = compare(
            out, expected(ctx, case, x, ids, w, tables), case.quant, f"{case.name} #{it}"
        )
        if problem:
            ctx.problems.append(problem)
        if metrics.get("max_err", 0.0) >= worst.get("max_err", 0.0):
            worst = metrics
    ctx.problems.extend(f"{case.name}: {p}" for p in kernel.experts.problems)
    return worst


def run_graph(ctx: Rank, quant: str, replays: int, calls: Any) -> dict[str, float]:
    """An LL forward captured in a CUDA graph (vLLM captures decode), replayed on fresh inputs."""
    case = Case(f"ll-{quant}-cuda-graph", "ll", quant=quant)
    _, kernel, _ = build(ctx, case, calls)
    tokens = max(1, ctx.sizes.ll_max_tokens - 3 * ctx.rank)  # each rank its own static batch
    static = inputs(ctx, case, seed=9000, tokens=tokens)
    emap = ctx.expert_map()

    def forward() -> torch.Tensor:
        x, ids, w = static
        return kernel.apply(x, w, ids, ctx.sizes.experts, emap, False)

    graph, out = capture_graph(forward)
    worst: dict[str, float] = {}
    for i in range(replays):
        fresh = inputs(ctx, Case(case.name, "ll", routing=("random", "hot")[i % 2]), 9001 + i, tokens)
        for dst, src in zip(static, fresh, strict=True):
            dst.copy_(src)
        graph.replay()
        metrics, problem = compare(out, expected(ctx, case, *fresh, None), quant, f"{case.name} replay {i}")
        if problem:
            ctx.problems.append(problem)
        if metrics.get("max_err", 0.0) >= worst.get("max_err", 0.0):
            worst = metrics
    ctx.problems.extend(f"{case.name}: {p}" for p in kernel.experts.problems)
    return worst


def run_rank(
    backend: str, sizes: Sizes | None = None, graph_replays: int = 0, cases: list[Case] | None = None
) -> dict[str, Any]:
    """Every case (and the CUDA-graph replays) on this rank; returns ``{"vllm": "vllm"|"stand-ins",
    "backend", "cases": {name: worst metrics}, "skipped": [...], "problems": [...]}``."""
    vllm = ensure_vllm()
    # After ensure_vllm: these import vLLM's names (or their stand-ins).
    from ncclep.vllm.all2all import ENV_BACKEND, NcclepHTAll2AllManager, NcclepLLAll2AllManager

    from . import vllm_calls

    sizes = sizes or Sizes()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "cuda" else torch.device("cpu")
    ctx = Rank(
        backend,
        sizes,
        rank,
        world,
        device,
        ExpertWeights.make(sizes.experts, sizes.hidden, sizes.ffn, device),
        {"ll": NcclepLLAll2AllManager.for_process_group(), "ht": NcclepHTAll2AllManager.for_process_group()},
        vllm,
    )
    previous = os.environ.get(ENV_BACKEND)
    os.environ[ENV_BACKEND] = backend
    results: dict[str, dict[str, float]] = {}
    skipped = []
    try:
        for index, case in enumerate(cases if cases is not None else CASES):
            if vllm == "vllm" and device.type == "cpu" and needs_vllm_cuda_ops(case):
                skipped.append(case.name)
                continue
            results[case.name] = run_case(ctx, case, index, vllm_calls)
        for quant in GRAPH_QUANTS if graph_replays else ():
            results[f"ll-{quant}-cuda-graph"] = run_graph(ctx, quant, graph_replays, vllm_calls)
        for manager in ctx.managers.values():
            for group in manager.handle_cache.values():
                group.check()
    finally:
        for manager in ctx.managers.values():
            manager.destroy()
        if previous is None:
            os.environ.pop(ENV_BACKEND, None)
        else:
            os.environ[ENV_BACKEND] = previous
    return {"vllm": vllm, "backend": backend, "cases": results, "skipped": skipped, "problems": ctx.problems}


def assert_passed(per_rank: list[dict[str, Any]], backend: str, graphs: bool = False) -> None:
    """The test side: no problem on any rank, every case run (or skipped for want of vLLM's CUDA
    ops); prints each case's worst error over the ranks (``pytest -s`` shows it)."""
    problems = [f"rank {r}: {p}" for r, result in enumerate(per_rank) for p in result["problems"]]
    assert problems == [], "\n".join(problems)
    names = {c.name for c in CASES} | ({f"ll-{q}-cuda-graph" for q in GRAPH_QUANTS} if graphs else set())
    for result in per_rank:
        assert result["backend"] == backend
        assert set(result["cases"]) | set(result["skipped"]) == names
    print(f"\nvLLM names: {per_rank[0]['vllm']}; skipped: {per_rank[0]['skipped']}")
    for name in per_rank[0]["cases"]:
        worst = max((r["cases"][name] for r in per_rank), key=lambda m: m.get("max_err", 0.0))
        print(f"  {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in worst.items()))
