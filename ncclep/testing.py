"""Straightforward per-token oracles of the four ops, for tests and ``bench --validate``.

Each rank gathers every rank's inputs and loops over tokens: no shared code with the backends
except fp8 quantisation (which has its own scalar check in the tests). Slow; small sizes only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from . import fp8
from .config import GroupConfig


@dataclass
class RankInputs:
    x: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor | None


def gather_tensor(group: dist.ProcessGroup | None, t: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Every rank's ``t`` on the CPU. Travels as bytes: pickling fp8 tensors is not supported."""
    packed = None
    if t is not None:
        # a fresh tensor: "contiguous" tensors with a size-0/1 dim may have strides view() rejects
        dense = torch.empty(t.shape, dtype=t.dtype).copy_(t.detach())
        packed = (dense.view(torch.uint8), t.dtype, tuple(t.shape))
    world: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(world, packed, group=group)
    return [None if p is None else p[0].view(p[1]).reshape(p[2]) for p in world]


def gather_inputs(
    group: dist.ProcessGroup | None,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor | None,
) -> list[RankInputs]:
    xs = gather_tensor(group, x)
    idxs = gather_tensor(group, topk_idx.long())
    ws = gather_tensor(group, topk_weights)
    return [RankInputs(a, b, c) for a, b, c in zip(xs, idxs, ws, strict=True)]  # type: ignore[arg-type]


def _owner(expert: int, cfg: GroupConfig) -> int:
    return expert // cfg.num_local_experts


@dataclass
class ExpectedRow:
    src: int
    token: int
    payload: torch.Tensor
    scales: torch.Tensor | None
    weight: float


def ll_dispatch_expected(
    cfg: GroupConfig, rank: int, world: list[RankInputs], use_fp8: bool, ue8m0: bool
) -> list[list[ExpectedRow]]:
    """For each local expert, its rows in order: (source rank, token index) ascending."""
    experts: list[list[ExpectedRow]] = [[] for _ in range(cfg.num_local_experts)]
    for src, inp in enumerate(world):
        for b in range(inp.x.shape[0]):
            row = inp.x[b : b + 1]
            q, s = fp8.quantize(row, ue8m0) if use_fp8 else (row, None)
            for k in range(inp.topk_idx.shape[1]):
                e = int(inp.topk_idx[b, k])
                if e >= 0 and _owner(e, cfg) == rank:
                    w = float(inp.topk_weights[b, k]) if inp.topk_weights is not None else 1.0
                    experts[e - rank * cfg.num_local_experts].append(
                        ExpectedRow(src, b, q[0], None if s is None else s[0], w)
                    )
    return experts


def ll_combine_expected(cfg: GroupConfig, rank: int, world: list[RankInputs], expert_fn: Any) -> torch.Tensor:
    """fp32 ``Σ_k w[b,k] · expert_fn(expert, x[b])`` for this rank's tokens."""
    mine = world[rank]
    out = torch.zeros(mine.x.shape, dtype=torch.float32)
    for b in range(mine.x.shape[0]):
        for k in range(mine.topk_idx.shape[1]):
            e = int(mine.topk_idx[b, k])
            if e >= 0:
                w = float(mine.topk_weights[b, k]) if mine.topk_weights is not None else 1.0
                out[b] += w * expert_fn(e, mine.x[b]).float()
    return out


@dataclass
class ExpectedHTRow:
    src: int
    token: int
    local_ids: list[int]
    weights: list[float]


def ht_dispatch_expected(
    cfg: GroupConfig, rank: int, world: list[RankInputs], layout: str, alignment: int
) -> tuple[list[ExpectedHTRow | None], list[int]]:
    """Rows this rank receives (None marks alignment padding) and the per-expert counts."""
    local = cfg.num_local_experts
    tokens: list[ExpectedHTRow] = []
    for src, inp in enumerate(world):
        for b in range(inp.x.shape[0]):
            ids, ws = [], []
            for k in range(inp.topk_idx.shape[1]):
                e = int(inp.topk_idx[b, k])
                here = e >= 0 and _owner(e, cfg) == rank
                ids.append(e - rank * local if here else -1)
                w = float(inp.topk_weights[b, k]) if inp.topk_weights is not None else 0.0
                ws.append(w if here else 0.0)
            if any(i >= 0 for i in ids):
                tokens.append(ExpectedHTRow(src, b, ids, ws))
    counts = [sum(e in t.local_ids for t in tokens) for e in range(local)]
    if layout == "flat":
        return list(tokens), counts
    rows: list[ExpectedHTRow | None] = []
    for e in range(local):
        segment = [t for t in tokens if e in t.local_ids]
        rows.extend(segment)
        rows.extend([None] * (-len(segment) % alignment))
    return rows, counts


def ht_combine_expected(
    cfg: GroupConfig, rank: int, world: list[RankInputs], layout: str, row_fn: Any
) -> torch.Tensor:
    """fp32 sum over every row that came from each of this rank's tokens.

    ``row_fn(dest_rank, local_expert_or_None, x_row)`` is what the expert rank put in that row
    (``local_expert`` is None in the flat layout, where a token has one row per rank).
    """
    mine = world[rank]
    local = cfg.num_local_experts
    out = torch.zeros(mine.x.shape, dtype=torch.float32)
    for b in range(mine.x.shape[0]):
        experts = [int(e) for e in mine.topk_idx[b] if int(e) >= 0]
        for d in sorted({_owner(e, cfg) for e in experts}):
            if layout == "flat":
                out[b] += row_fn(d, None, mine.x[b]).float()
            else:
                for e in sorted(e for e in experts if _owner(e, cfg) == d):
                    out[b] += row_fn(d, e - d * local, mine.x[b]).float()
    return out
