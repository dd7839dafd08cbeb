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
from .handles import HTDispatchOutput, LLDispatchOutput

COMBINE_TOLERANCE = 1e-2
"""Relative error allowed between a combine and the reference's: bf16 rounding of sums taken in
another order."""


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
    cfg: GroupConfig,
    rank: int,
    world: list[RankInputs],
    use_fp8: bool,
    ue8m0: bool,
    round_scale: bool = False,
) -> list[list[ExpectedRow]]:
    """For each local expert, its rows in order: (source rank, token index) ascending."""
    experts: list[list[ExpectedRow]] = [[] for _ in range(cfg.num_local_experts)]
    for src, inp in enumerate(world):
        for b in range(inp.x.shape[0]):
            row = inp.x[b : b + 1]
            q, s = fp8.quantize(row, ue8m0, round_scale) if use_fp8 else (row, None)
            for k in range(inp.topk_idx.shape[1]):
                e = int(inp.topk_idx[b, k])
                if e >= 0 and _owner(e, cfg) == rank:
                    w = float(inp.topk_weights[b, k]) if inp.topk_weights is not None else 1.0
                    experts[e - rank * cfg.num_local_experts].append(
                        ExpectedRow(src, b, q[0], None if s is None else s[0], w)
                    )
    return experts


def scaled_expert(num_experts: int) -> Any:
    """An expert for combine checks: ``expert_fn(e, rows)`` = rows times (e + 1) / num_experts, in
    bf16, so that every expert's rows differ and a row summed under the wrong expert shows."""

    def expert_fn(expert: int, rows: torch.Tensor) -> torch.Tensor:
        return (rows.float() * ((expert + 1) / num_experts)).to(torch.bfloat16)

    return expert_fn


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


# ---------------------------------------------------------------- one backend against another


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``|out - ref| / |ref|`` (Frobenius); NaN or inf when either holds one."""
    if out.numel() == 0 and ref.numel() == 0:
        return 0.0
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-20))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _rows_differ(a: torch.Tensor, b: torch.Tensor, used: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` differ bitwise on the rows where ``used`` (their leading dims) holds."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return True
    diff = (_bytes(a) != _bytes(b)).flatten(used.dim()).any(dim=-1)
    return bool((diff & used).any())


def ll_dispatch_difference(a: LLDispatchOutput, b: LLDispatchOutput) -> str | None:
    """What differs between an LL dispatch and the reference's ``b`` (None: nothing): counts, handle,
    and payload and scales bit for bit on the rows in use (padding rows are unspecified)."""
    if not torch.equal(a.expert_counts, b.expert_counts):
        return f"expert_counts {a.expert_counts.tolist()} != reference {b.expert_counts.tolist()}"
    rows = b.x.shape[1]
    used = torch.arange(rows, device=b.x.device).unsqueeze(0) < b.expert_counts.unsqueeze(1).long()
    problem = _payload_difference(a, b, used)
    if problem:
        return problem
    for name in ("send_slots", "recv_rows", "recv_weights", "recv_slot_counts"):
        if not torch.equal(getattr(a.handle, name), getattr(b.handle, name)):
            return f"handle.{name} differs"
    return None


def ht_dispatch_difference(a: HTDispatchOutput, b: HTDispatchOutput) -> str | None:
    """What differs between an HT dispatch and the reference's ``b`` (None: nothing): counts, local
    expert ids, weights, handle, and payload and scales bit for bit on the rows holding a token."""
    if a.topk_idx.dtype != b.topk_idx.dtype:  # torch.equal does not compare dtypes
        return f"topk_idx dtype differs ({a.topk_idx.dtype}, {b.topk_idx.dtype})"
    for name in ("num_recv", "expert_counts", "topk_idx"):
        if not torch.equal(getattr(a, name), getattr(b, name)):
            return f"{name} differs"
    for name in ("send_pos", "recv_slot", "recv_counts"):
        if not torch.equal(getattr(a.handle, name), getattr(b.handle, name)):
            return f"handle.{name} differs"
    if (a.topk_weights is None) != (b.topk_weights is None):
        return "topk_weights presence differs"
    if (
        a.topk_weights is not None
        and b.topk_weights is not None
        and not torch.equal(_bytes(a.topk_weights), _bytes(b.topk_weights))
    ):
        return "topk_weights differ"
    return _payload_difference(a, b, b.handle.recv_slot >= 0)


def _payload_difference(a: Any, b: Any, used: torch.Tensor) -> str | None:
    """Dispatch payload and scales of ``a`` against ``b``'s, bit for bit on the ``used`` rows."""
    if _rows_differ(a.x, b.x, used):
        return "dispatch payload differs on rows in use"
    if (a.scales is None) != (b.scales is None):
        return "scales presence differs"
    if a.scales is not None and b.scales is not None:
        if a.scales.stride() != b.scales.stride():
            return f"scales strides {a.scales.stride()} != reference {b.scales.stride()}"
        if _rows_differ(a.scales, b.scales, used):
            return "dispatch scales differ on rows in use"
    return None
