"""The benchmark's routings (docs/benchmarking.md), shared by the benchmark, the examples and the tests."""

from __future__ import annotations

import torch

ROUTINGS = ("random", "uniform", "skewed", "hot")
ZIPF_S = 1.2


def make_routing(
    kind: str,
    tokens: int,
    num_experts: int,
    topk: int,
    *,
    world_size: int,
    generator: torch.Generator,
    masked: int = 0,
    hot_rank: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_idx int64 [B, K], topk_weights fp32 [B, K]) on the CPU; distinct experts per token.

    random: top-k of |randn|+1 scores. uniform: k distinct experts uniformly at random.
    skewed: Zipf-like popularity (s = 1.2) over a random order of the experts.
    hot: every token picks experts of ``hot_rank`` only.
    ``masked`` entries, chosen at random, are set to -1.
    """
    if kind not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {kind!r}")
    if topk > num_experts:
        raise ValueError(f"top-k {topk} exceeds the {num_experts} experts")
    g = generator
    if kind == "random":
        scores = torch.randn(tokens, num_experts, generator=g).abs() + 1
        idx = scores.topk(topk, dim=1).indices
    elif kind == "uniform":
        idx = torch.rand(tokens, num_experts, generator=g).topk(topk, dim=1).indices
    elif kind == "skewed":
        order = torch.randperm(num_experts, generator=g)
        popularity = torch.empty(num_experts)
        popularity[order] = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float32) ** ZIPF_S
        if tokens:
            idx = torch.multinomial(popularity.expand(tokens, -1), topk, generator=g)
        else:
            idx = torch.empty((0, topk), dtype=torch.int64)
    else:
        local = num_experts // world_size
        if topk > local:
            raise ValueError(f"hot routing needs top-k ({topk}) <= experts per rank ({local})")
        pick = torch.rand(tokens, local, generator=g).topk(topk, dim=1).indices
        idx = pick + hot_rank * local
    weights = torch.rand(tokens, topk, generator=g) + 0.1
    weights = weights / weights.sum(dim=1, keepdim=True)
    idx = idx.to(torch.int64)
    if masked and tokens:
        flat = idx.view(-1)
        chosen = torch.randperm(flat.numel(), generator=g)[: min(masked, flat.numel())]
        flat[chosen] = -1
        weights.view(-1)[chosen] = 0.0
    return idx, weights
