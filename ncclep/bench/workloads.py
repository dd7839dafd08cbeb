"""The benchmark's case list (BENCHMARKS.md), and the smaller one for hosts without a GPU."""

from __future__ import annotations

from dataclasses import asdict, dataclass


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

CPU_LL_TOKENS = (1, 8, 32)
CPU_HT_TOKENS = (64, 256)
CPU_HIDDEN, CPU_TOPK, CPU_EXPERTS = 512, 4, 16


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
    """The main rows of BENCHMARKS.md; with ``full``, the extra hidden sizes, top-k and routings
    at the bold sizes. Explicit ``tokens``/``hidden``/``topk``/``experts``/``routings`` override."""
    h = hidden or (HIDDEN if gpu else CPU_HIDDEN)
    k = topk or (TOPK if gpu else CPU_TOPK)
    e = experts or (EXPERTS if gpu else CPU_EXPERTS)
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
