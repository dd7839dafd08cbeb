"""The benchmark's case list (docs/benchmarking.md), and the smaller one for hosts without a GPU."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..workloads import make_routing


@dataclass(frozen=True)
class Case:
    mode: str  # "ll" or "ht"
    tokens: int
    hidden: int
    topk: int
    experts: int
    routing: str
    dtype: str  # dispatch payload: "bf16" or "fp8"

    def label(self) -> str:
        return (
            f"{self.mode} {self.dtype} {self.routing} tokens={self.tokens} hidden={self.hidden} "
            f"topk={self.topk} experts={self.experts}"
        )

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


LL_TOKENS = (1, 8, 32, 64, 128, 256)
HT_TOKENS = (512, 1024, 2048, 4096, 8192)
LL_BOLD, HT_BOLD = 128, 4096
HIDDEN, TOPK, EXPERTS = 7168, 8, 256

LL_MASKED_FRACTION = 0.1  # of the LL ``random`` routing's entries set to -1 (DeepEP's tests mask some)

CPU_LL_TOKENS = (1, 8, 32)
CPU_HT_TOKENS = (64, 256)
CPU_HIDDEN, CPU_TOPK, CPU_EXPERTS = 512, 4, 16


def shape(gpu: bool, hidden: int | None, topk: int | None, experts: int | None) -> tuple[int, int, int]:
    """(hidden, top-k, experts): the ones given, else the defaults for GPUs or CPU processes."""
    return (
        hidden or (HIDDEN if gpu else CPU_HIDDEN),
        topk or (TOPK if gpu else CPU_TOPK),
        experts or (EXPERTS if gpu else CPU_EXPERTS),
    )


def default_cases(
    modes: list[str],
    dtypes: list[str],
    *,
    gpu: bool,
    full: bool,
    tokens: list[int] | None,
    hidden: int | None,
    topk: int | None,
    experts: int | None,
    routings: list[str] | None,
) -> list[Case]:
    """The main rows of docs/benchmarking.md; with ``full``, the extra hidden sizes, top-k and routings
    at the bold sizes. Explicit ``tokens``/``hidden``/``topk``/``experts``/``routings`` override."""
    h, k, e = shape(gpu, hidden, topk, experts)
    cases: list[Case] = []
    for mode in modes:
        sizes = tokens or list(
            (LL_TOKENS if gpu else CPU_LL_TOKENS) if mode == "ll" else (HT_TOKENS if gpu else CPU_HT_TOKENS)
        )
        main_routing = "random" if mode == "ll" else "uniform"
        for dtype in dtypes:
            for routing in routings or [main_routing]:
                cases += [Case(mode, t, h, k, e, routing, dtype) for t in sizes]
        if full and gpu:
            bold = LL_BOLD if mode == "ll" else HT_BOLD
            for extra_hidden in (2048, 4096):
                cases.append(Case(mode, bold, extra_hidden, k, e, main_routing, "bf16"))
            for extra_topk in (4, 16):
                cases.append(Case(mode, bold, h, extra_topk, e, main_routing, "bf16"))
            for extra_routing in ("skewed", "hot"):
                cases.append(Case(mode, bold, h, k, e, extra_routing, "bf16"))
    return cases


def mask_entries(
    topk_idx: torch.Tensor, topk_weights: torch.Tensor, fraction: float, generator: torch.Generator
) -> None:
    """Set ``round(fraction * entries)`` entries of ``topk_idx`` to -1 (their weights to 0), chosen
    at random but never all of a token's: each token keeps one entry, picked at random first. So a
    1-token batch of top-8 keeps 7 of 8 entries at 10 %, and top-1 is never masked."""
    tokens, topk = topk_idx.shape
    if tokens == 0 or topk < 2 or fraction <= 0:
        return
    kept = torch.randint(topk, (tokens,), generator=generator)
    column = torch.arange(topk).expand(tokens, topk)
    candidates = (column != kept.unsqueeze(1)).flatten().nonzero().flatten()
    count = min(round(fraction * tokens * topk), candidates.numel())
    chosen = candidates[torch.randperm(candidates.numel(), generator=generator)[:count]]
    topk_idx.view(-1)[chosen] = -1
    topk_weights.view(-1)[chosen] = 0.0


def case_routing(
    case: Case, world_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The case's routing on the CPU: :func:`ncclep.workloads.make_routing`, and for LL ``random``
    routing :data:`LL_MASKED_FRACTION` of the entries masked (:func:`mask_entries`)."""
    idx, weights = make_routing(
        case.routing, case.tokens, case.experts, case.topk, world_size=world_size, generator=generator
    )
    if case.mode == "ll" and case.routing == "random":
        mask_entries(idx, weights, LL_MASKED_FRACTION, generator)
    return idx, weights
