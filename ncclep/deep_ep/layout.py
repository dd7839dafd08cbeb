"""``get_dispatch_layout``'s arithmetic: where each token goes, counted per rank, node and expert.

Device ops only (no host synchronisation), any top-k, ``-1`` for no choice.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class DispatchLayout(NamedTuple):
    num_tokens_per_rank: torch.Tensor
    """[R] int32: tokens with at least one expert on each rank."""
    num_tokens_per_rdma_rank: torch.Tensor | None
    """[nodes] int32: tokens with at least one expert on each node; None on one node."""
    num_tokens_per_expert: torch.Tensor
    """[E] int32: choices of each expert."""
    is_token_in_rank: torch.Tensor
    """[B, R] bool: whether each token goes to each rank."""


_ones: dict[torch.device, torch.Tensor] = {}


def _one(device: torch.device) -> torch.Tensor:
    """A 1-element int32 one on ``device`` (expanded, it is the increments of a count)."""
    one = _ones.get(device)
    if one is None:
        one = _ones[device] = torch.ones(1, dtype=torch.int32, device=device)
    return one


def dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, world_size: int, num_nodes: int
) -> DispatchLayout:
    """The layout of ``topk_idx [B, K]`` (expert ids, -1 for none) over ``world_size`` ranks that
    hold ``num_experts / world_size`` experts each, ``num_nodes`` consecutive blocks of ranks."""
    tokens = topk_idx.shape[0]
    device = topk_idx.device
    idx = topk_idx.long()
    per_rank = num_experts // world_size
    # -1 (no choice) lands on a spare expert E and a spare rank R: -1 mod (n + 1) = n
    spare_expert = idx.remainder(num_experts + 1).reshape(-1)
    per_expert = torch.zeros(num_experts + 1, dtype=torch.int32, device=device)
    per_expert.index_add_(0, spare_expert, _one(device).expand(spare_expert.numel()))
    rank_of = idx.div(per_rank, rounding_mode="floor").remainder_(world_size + 1)
    in_rank = torch.zeros((tokens, world_size + 1), dtype=torch.bool, device=device)
    in_rank.scatter_(1, rank_of, True)
    is_token_in_rank = in_rank[:, :world_size].contiguous()
    per_rdma = None
    if num_nodes > 1:
        per_node = is_token_in_rank.view(tokens, num_nodes, world_size // num_nodes).any(dim=2)
        per_rdma = per_node.sum(dim=0, dtype=torch.int32)
    return DispatchLayout(
        num_tokens_per_rank=is_token_in_rank.sum(dim=0, dtype=torch.int32),
        num_tokens_per_rdma_rank=per_rdma,
        num_tokens_per_expert=per_expert[:num_experts],
        is_token_in_rank=is_token_in_rank,
    )
