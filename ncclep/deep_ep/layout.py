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


def dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, world_size: int, num_nodes: int
) -> DispatchLayout:
    """The layout of ``topk_idx [B, K]`` (expert ids, -1 for none) over ``world_size`` ranks that
    hold ``num_experts / world_size`` experts each, ``num_nodes`` consecutive blocks of ranks.

    One ``[B, E+1]`` table of which experts each token chose (column E takes the -1s) gives all
    the counts: six device ops in all.
    """
    tokens = topk_idx.shape[0]
    chosen = torch.zeros((tokens, num_experts + 1), dtype=torch.bool, device=topk_idx.device)
    chosen.scatter_(1, topk_idx.long().remainder(num_experts + 1), True)  # -1 mod (E + 1) = E
    per_expert = chosen.sum(dim=0, dtype=torch.int32)
    is_token_in_rank = chosen[:, :num_experts].view(tokens, world_size, num_experts // world_size).any(dim=2)
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
