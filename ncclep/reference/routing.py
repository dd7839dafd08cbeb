"""Routing arithmetic shared by the reference LL and HT paths."""

from __future__ import annotations

import torch

from ..config import GroupConfig
from ..errors import InvalidArgument
from ..validate import check_expert_ids


def rejected(cfg: GroupConfig, topk_idx: torch.Tensor) -> InvalidArgument | None:
    """The value check of topk_idx, returned rather than raised (peers must hear of it first)."""
    try:
        check_expert_ids(cfg, topk_idx)
    except InvalidArgument as exc:
        return exc
    return None


def destination_mask(topk_idx: torch.Tensor, experts_per_rank: int, world_size: int) -> torch.Tensor:
    """[B, R] bool: token b has at least one expert on rank d."""
    tokens = topk_idx.shape[0]
    mask = torch.zeros((tokens, world_size), dtype=torch.bool, device=topk_idx.device)
    valid = topk_idx >= 0
    ranks = torch.where(valid, topk_idx // experts_per_rank, 0)
    rows = torch.arange(tokens, device=topk_idx.device).unsqueeze(1).expand_as(ranks)
    mask[rows[valid], ranks[valid]] = True
    return mask


def slots_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, R] int32: the slot of token b among the tokens going to rank d (token order), else -1."""
    slots = mask.to(torch.int32).cumsum(dim=0, dtype=torch.int32) - 1
    return torch.where(mask, slots, torch.full_like(slots, -1))


def sender_order(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Messages grouped by destination rank, tokens ascending within each.

    Returns (token index of each message, destination of each message, count per destination).
    """
    dest, token = mask.t().nonzero(as_tuple=True)
    counts = mask.sum(dim=0).tolist()
    return token, dest, counts


def local_choices(topk_idx: torch.Tensor, dest: torch.Tensor, experts_per_rank: int) -> torch.Tensor:
    """For messages (rows of topk_idx) sent to ranks ``dest``: local expert ids there, else -1."""
    idx = topk_idx.long()
    on_dest = (idx >= 0) & (idx // experts_per_rank == dest.unsqueeze(1))
    return torch.where(on_dest, idx - dest.unsqueeze(1) * experts_per_rank, -1).to(torch.int32)


def positions_within_expert(
    local_ids: torch.Tensor, num_local_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row of each (message, choice) inside its expert, messages in arrival order.

    local_ids [M, K] int32 with -1 for none. Returns (positions [M, K] int64 with -1 for none,
    counts [L] int64).
    """
    messages, topk = local_ids.shape
    valid = local_ids >= 0
    experts = local_ids.long()
    counts = torch.bincount(experts[valid], minlength=num_local_experts)
    # Experts are distinct within a message, so (expert, message) orders the pairs uniquely.
    message_of = torch.arange(messages, device=local_ids.device).unsqueeze(1).expand(messages, topk)
    keys = experts * max(messages, 1) + message_of
    keys = torch.where(valid, keys, torch.iinfo(torch.int64).max)
    order = keys.reshape(-1).argsort()
    starts = torch.cumsum(counts, 0) - counts
    n_valid = int(valid.sum())
    ranked = torch.arange(n_valid, device=local_ids.device) - starts[experts.reshape(-1)[order[:n_valid]]]
    positions = torch.full((messages * topk,), -1, dtype=torch.int64, device=local_ids.device)
    positions[order[:n_valid]] = ranked
    return positions.reshape(messages, topk), counts


def message_source(recv_counts: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(source rank, slot) of each received message; messages arrive grouped by source."""
    counts = torch.tensor(recv_counts, dtype=torch.int64, device=device)
    src = torch.repeat_interleave(torch.arange(len(recv_counts), device=device), counts)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(src.numel(), device=device) - starts[src]
    return src, slot
