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

_rank_rows: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def _first_rows(ranks: int, slots: int, device: torch.device) -> torch.Tensor:
    """``[1, R]`` int64: the first row of each destination rank in a ``[R * slots, K]`` send buffer."""
    key = (ranks, slots, device)
    rows = _rank_rows.get(key)
    if rows is None:
        rows = _rank_rows[key] = (torch.arange(ranks, device=device) * slots).view(1, ranks)
    return rows


def weights_at_experts(process_group: Any, routing: LLHandle, topk_weights: torch.Tensor) -> torch.Tensor:
    """``recv_weights [R, T, Kmax]`` fp32 for ``routing``: the weight of each received slot's k-th
    choice, taken from ``topk_weights [B, K]`` on the token's rank (0 where the choice is not local).
    """
    send_slots = routing.send_slots  # [B, R]: slot of token b on rank d, -1 if it did not go there
    tokens, ranks = send_slots.shape
    recv_rows = routing.recv_rows
    slots, max_topk = recv_rows.shape[1], recv_rows.shape[2]
    topk = topk_weights.shape[1]
    device = topk_weights.device
    spare = ranks * slots  # one more row, where the (token, rank) pairs that were not sent go
    row = torch.where(send_slots >= 0, send_slots + _first_rows(ranks, slots, device), spare)
    outgoing = torch.zeros((spare + 1, topk), dtype=torch.float32, device=device)
    outgoing.index_put_((row,), topk_weights.float().unsqueeze(1).expand(tokens, ranks, topk))
    send = outgoing[:spare].view(ranks, slots, topk)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=process_group)
    if topk != max_topk:
        padded = torch.zeros((ranks, slots, max_topk), dtype=torch.float32, device=device)
        padded[:, :, :topk] = recv
        recv = padded
    return recv.masked_fill_(recv_rows < 0, 0.0)


def with_weights(process_group: Any, routing: LLHandle, topk_weights: torch.Tensor) -> LLHandle:
    """``routing`` with the weights of ``topk_weights`` in place of the dispatch's."""
    return LLHandle(
        send_slots=routing.send_slots,
        recv_rows=routing.recv_rows,
        recv_weights=weights_at_experts(process_group, routing, topk_weights),
        recv_slot_counts=routing.recv_slot_counts,
        group=routing.group,
    )
