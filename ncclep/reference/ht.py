"""Reference HT dispatch and combine: pure PyTorch over torch.distributed.

Dispatch sends a token once to each rank that holds any of its experts. ``flat`` keeps one row per
received token, ordered by source rank then token index; ``expert_major`` copies each token into
the segment of every local expert it chose (same order inside a segment), each segment padded to
``alignment`` rows. Combine sums, per token, every row that came from it (fp32), first on the
expert rank (one bf16 row per token and rank goes back), then over ranks on the owner.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import fp8
from ..config import GroupConfig
from ..handles import HTDispatchOutput, HTHandle
from .exchange import PendingRows, as_bytes, exchange_counts, exchange_rows, pack_rows, unpack_rows
from .routing import (
    destination_mask,
    local_choices,
    message_source,
    positions_within_expert,
    rejected,
    sender_order,
    slots_from_mask,
)


@dataclass
class HTDispatchInFlight:
    rows: PendingRows
    recv_counts: list[int]
    send_pos: torch.Tensor
    x_dtype: torch.dtype
    scales_dtype: torch.dtype | None
    hidden: int
    topk: int
    has_weights: bool
    layout: str
    alignment: int


@dataclass
class HTCombineInFlight:
    rows: PendingRows
    back_counts: list[int]
    send_pos: torch.Tensor
    hidden: int
    topk: int | None


class ReferenceHT:
    def __init__(self, cfg: GroupConfig, rank: int, group: dist.ProcessGroup | None) -> None:
        self.cfg = cfg
        self.rank = rank
        self.group = group

    def dispatch_send(
        self,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor | None,
        layout: str,
        alignment: int,
    ) -> HTDispatchInFlight:
        cfg = self.cfg
        problem = rejected(cfg, topk_idx)
        if problem is not None:
            zeros = torch.zeros(cfg.world_size, dtype=torch.int64, device=x.device)
            exchange_counts(zeros, self.group, phase="ht_dispatch", problem=problem)
        idx = topk_idx.long()
        mask = destination_mask(idx, cfg.num_local_experts, cfg.world_size)
        token, dest, send_counts = sender_order(mask)
        local = local_choices(idx[token], dest, cfg.num_local_experts)
        parts = [x[token]]
        if x_scales is not None:
            parts.append(x_scales[token])
        parts.append(local)
        if topk_weights is not None:
            parts.append(torch.where(local >= 0, topk_weights[token], 0.0))
        counts = torch.tensor(send_counts, dtype=torch.int64, device=x.device)
        recv_counts = exchange_counts(counts, self.group, phase="ht_dispatch")
        return HTDispatchInFlight(
            rows=exchange_rows(pack_rows(parts), send_counts, recv_counts, self.group),
            recv_counts=recv_counts,
            send_pos=slots_from_mask(mask),
            x_dtype=x.dtype,
            scales_dtype=None if x_scales is None else x_scales.dtype,
            hidden=x.shape[1],
            topk=idx.shape[1],
            has_weights=topk_weights is not None,
            layout=layout,
            alignment=alignment,
        )

    def dispatch_recv(self, state: HTDispatchInFlight) -> HTDispatchOutput:
        cfg = self.cfg
        hidden, topk = state.hidden, state.topk
        rows = state.rows.wait()
        device = rows.device
        specs: list[tuple[torch.dtype, tuple[int, ...]]] = [(state.x_dtype, (hidden,))]
        if state.scales_dtype is not None:
            specs.append((state.scales_dtype, (hidden // 128,)))
        specs.append((torch.int32, (topk,)))
        if state.has_weights:
            specs.append((torch.float32, (topk,)))
        parts = unpack_rows(rows, specs)
        local = parts[1 + (state.scales_dtype is not None)]
        messages = local.shape[0]
        src, slot = message_source(state.recv_counts, device)
        slot_id = (src * cfg.max_tokens_per_rank + slot).to(torch.int32)
        num_rows = cfg.ht_num_rows(topk, state.layout, state.alignment)

        if state.layout == "flat":
            expert_counts = torch.bincount(local[local >= 0].long(), minlength=cfg.num_local_experts)
            row_of_message = torch.arange(messages, device=device)
            message_of_row = row_of_message
            used = messages
        else:
            positions, expert_counts = positions_within_expert(local, cfg.num_local_experts)
            align = state.alignment
            padded = (expert_counts + align - 1) // align * align
            starts = torch.cumsum(padded, 0) - padded
            valid = local >= 0
            row_of_message = (starts[local.long().clamp_min(0)] + positions)[valid]
            message_of_row = torch.arange(messages, device=device).unsqueeze(1).expand_as(local)[valid]
            used = int(padded.sum())

        def scatter(src_rows: torch.Tensor, fill: float | None) -> torch.Tensor:
            shape = (num_rows, *src_rows.shape[1:])
            if fill is None:
                out = torch.empty(shape, dtype=src_rows.dtype, device=device)
            else:
                out = torch.full(shape, fill, dtype=src_rows.dtype, device=device)
            # index_put has no float8_e8m0fnu kernel: scatter UE8M0 scales as bytes
            raw = src_rows.dtype == fp8.UE8M0_DTYPE
            (out.view(torch.uint8) if raw else out)[row_of_message] = (
                src_rows[message_of_row].view(torch.uint8) if raw else src_rows[message_of_row]
            )
            return out

        recv_x = scatter(parts[0], None)
        recv_scales = scatter(parts[1], None) if state.scales_dtype is not None else None
        recv_idx = scatter(local, -1)
        recv_weights = scatter(parts[-1], 0.0) if state.has_weights else None
        recv_slot = scatter(slot_id, -1)
        handle = HTHandle(
            send_pos=state.send_pos,
            recv_slot=recv_slot,
            recv_counts=torch.tensor(state.recv_counts, dtype=torch.int32, device=device),
            recv_topk_idx=recv_idx,
        )
        return HTDispatchOutput(
            x=recv_x,
            scales=recv_scales,
            topk_idx=recv_idx,
            topk_weights=recv_weights,
            num_recv=torch.tensor([used], dtype=torch.int32, device=device),
            expert_counts=expert_counts.to(torch.int32),
            handle=handle,
        )

    def dispatch_cached(self, x: torch.Tensor, handle: HTHandle) -> torch.Tensor:
        """Route ``x [B, ...]`` (e.g. gradients) along an earlier dispatch: ``[N, ...]``, zeros on
        rows that hold no token. No counts are exchanged: the handle has them."""
        cfg = self.cfg
        mask = handle.send_pos >= 0
        _, token = mask.t().nonzero(as_tuple=True)  # by destination, then slot (= token) order
        send_counts = mask.sum(dim=0).tolist()
        recv_counts = handle.recv_counts.tolist()
        rest = tuple(x.shape[1:])
        rows = exchange_rows(as_bytes(x[token]), send_counts, recv_counts, self.group).wait()
        messages = rows.view(x.dtype).reshape(rows.shape[0], *rest)
        starts = torch.cumsum(handle.recv_counts.long(), 0) - handle.recv_counts.long()
        used = handle.recv_slot >= 0
        slot_id = handle.recv_slot[used].long()
        message = starts[slot_id // cfg.max_tokens_per_rank] + slot_id % cfg.max_tokens_per_rank
        out = torch.zeros((handle.recv_slot.shape[0], *rest), dtype=x.dtype, device=x.device)
        out[used] = messages[message]
        return out

    def combine_send(
        self, x: torch.Tensor, handle: HTHandle, topk_weights: torch.Tensor | None
    ) -> HTCombineInFlight:
        cfg = self.cfg
        hidden = x.shape[1]
        slot_counts = handle.recv_counts.tolist()
        starts = torch.cumsum(handle.recv_counts.long(), 0) - handle.recv_counts.long()
        messages = sum(slot_counts)
        used = handle.recv_slot >= 0
        slot_id = handle.recv_slot[used].long()
        message = starts[slot_id // cfg.max_tokens_per_rank] + slot_id % cfg.max_tokens_per_rank
        partial = torch.zeros((messages, hidden), dtype=torch.float32, device=x.device)
        partial.index_add_(0, message, x[used].float())
        parts = [partial.to(torch.bfloat16)]
        topk = None
        if topk_weights is not None:
            topk = topk_weights.shape[1]
            local = handle.recv_topk_idx >= 0
            masked = torch.where(local, topk_weights, 0.0)[used]
            partial_w = torch.zeros((messages, topk), dtype=torch.float32, device=x.device)
            partial_w.index_add_(0, message, masked)
            parts.append(partial_w)
        back_counts = (handle.send_pos >= 0).sum(dim=0).tolist()
        pending = exchange_rows(pack_rows(parts), slot_counts, back_counts, self.group)
        return HTCombineInFlight(pending, back_counts, handle.send_pos, hidden, topk)

    def combine_recv(self, state: HTCombineInFlight) -> tuple[torch.Tensor, torch.Tensor | None]:
        specs: list[tuple[torch.dtype, tuple[int, ...]]] = [(torch.bfloat16, (state.hidden,))]
        if state.topk is not None:
            specs.append((torch.float32, (state.topk,)))
        parts = unpack_rows(state.rows.wait(), specs)
        send_pos = state.send_pos
        tokens = send_pos.shape[0]
        total = torch.zeros((tokens, state.hidden), dtype=torch.float32, device=send_pos.device)
        total_w = None
        if state.topk is not None:
            total_w = torch.zeros((tokens, state.topk), dtype=torch.float32, device=send_pos.device)
        start = 0
        for d, count in enumerate(state.back_counts):
            chosen = send_pos[:, d] >= 0
            rows = start + send_pos[chosen, d].long()
            total[chosen] += parts[0][rows].float()
            if total_w is not None:
                total_w[chosen] += parts[1][rows]
            start += count
        return total.to(torch.bfloat16), total_w
