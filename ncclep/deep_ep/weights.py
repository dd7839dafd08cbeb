"""The LL combine's top-k weights, brought to the expert ranks.

ncclep's LL combine reduces a token's experts on each expert rank with the weights that travelled
with the dispatch, and sends one row per (token, rank) back. DeepEP's LL dispatch takes no weights:
they arrive with the combine, on the token's rank. So, unless the dispatch was given the same
weights, the combine first sends each token's weights to the ranks it went to, into the slots the
dispatch gave it there: one ``all_to_all_single`` of ``[R, T, K]`` fp32 over the group's process
group, no host synchronisation (a CUDA-graph-capturable NCCL collective on GPUs).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..handles import LLHandle


def weights_at_experts(process_group: Any, routing: LLHandle, topk_weights: torch.Tensor) -> torch.Tensor:
    """``recv_weights [R, T, Kmax]`` fp32 for ``routing``: the weight of each received slot's k-th
    choice, taken from ``topk_weights [B, K]`` on the token's rank (0 where the choice is not local).
    """
    send_slots = routing.send_slots  # [B, R]: slot of token b on rank d, -1 if it did not go there
    tokens, ranks = send_slots.shape
    slots, max_topk = routing.recv_rows.shape[1], routing.recv_rows.shape[2]
    topk = topk_weights.shape[1]
    device = topk_weights.device
    outgoing = torch.zeros((ranks, slots + 1, topk), dtype=torch.float32, device=device)  # slot T: spare
    dest = torch.arange(ranks, device=device).expand(tokens, ranks)
    slot = torch.where(send_slots >= 0, send_slots, slots).long()
    outgoing[dest, slot] = topk_weights.float().unsqueeze(1).expand(tokens, ranks, topk)
    send = outgoing[:, :slots].contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=process_group)
    weights = torch.zeros((ranks, slots, max_topk), dtype=torch.float32, device=device)
    weights[:, :, :topk] = recv
    return torch.where(routing.recv_rows >= 0, weights, 0.0)


def with_weights(process_group: Any, routing: LLHandle, topk_weights: torch.Tensor) -> LLHandle:
    """``routing`` with the weights of ``topk_weights`` in place of the dispatch's."""
    return LLHandle(
        send_slots=routing.send_slots,
        recv_rows=routing.recv_rows,
        recv_weights=weights_at_experts(process_group, routing, topk_weights),
        recv_slot_counts=routing.recv_slot_counts,
        group=routing.group,
    )
