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

from ..handles import HTDispatchOutput, HTHandle
from .backend import ReferenceBackend
from .exchange import Counts, PendingRows, as_bytes, pack_rows, unpack_rows
from .routing import (
    destination_mask,
    local_choices,
    message_source,
    positions_within_expert,
    rejected,
    scatter_rows,
    sender_order,
    slots_from_mask,
    sum_over_ranks,
)


@dataclass
class HTDispatchInFlight:
    rows: PendingRows
    recv_counts: Counts
    send_pos: torch.Tensor
    x_dtype: torch.dtype
    scales_dtype: torch.dtype | None
    hidden: int
    topk: int
    idx_dtype: torch.dtype
    has_weights: bool
    layout: str
    alignment: int


@dataclass
class HTCombineInFlight:
    rows: PendingRows
    back_counts: torch.Tensor
    send_pos: torch.Tensor
    hidden: int
    topk: int | None


class ReferenceHT(ReferenceBackend):
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
            self.exchange.reject("ht_dispatch", problem)
        idx = topk_idx.long()
        mask = destination_mask(idx, cfg.num_local_experts, cfg.world_size)
        token, dest, send_counts, _ = sender_order(mask)
        local = local_choices(idx[token], dest, cfg.num_local_experts)
        parts = [x[token]]
        if x_scales is not None:
            parts.append(x_scales[token])
        parts.append(local)
        if topk_weights is not None:
            parts.append(torch.where(local >= 0, topk_weights[token], 0.0))
        call, recv_counts = self.exchange.start("ht_dispatch", send_counts)
        return HTDispatchInFlight(
            rows=self.exchange.rows("ht_dispatch", call, pack_rows(parts), send_counts, recv_counts.host),
            recv_counts=recv_counts,
            send_pos=slots_from_mask(mask),
            x_dtype=x.dtype,
            scales_dtype=None if x_scales is None else x_scales.dtype,
            hidden=x.shape[1],
            topk=idx.shape[1],
            idx_dtype=topk_idx.dtype,
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
        src, slot = message_source(state.recv_counts.device, messages)
        slot_id = (src * cfg.max_tokens_per_rank + slot).to(torch.int32)
        num_rows = cfg.ht_num_rows(topk, state.layout, state.alignment)

        positions, expert_counts = positions_within_expert(local, cfg.num_local_experts)
        if state.layout == "flat":
            target = torch.arange(messages, device=device).unsqueeze(1)
            used = state.recv_counts.device.sum().reshape(1)
        else:
            align = state.alignment
            padded = (expert_counts + align - 1) // align * align
            starts = torch.cumsum(padded, 0) - padded
            target = torch.where(local >= 0, starts[local.long().clamp_min(0)] + positions, -1)
            used = padded.sum().reshape(1)

        def scatter(part: torch.Tensor, fill: float | None) -> torch.Tensor:
            return scatter_rows(part, target, num_rows, fill)

        recv_x = scatter(parts[0], None)
        recv_scales = scatter(parts[1], None) if state.scales_dtype is not None else None
        recv_idx = scatter(local.to(state.idx_dtype), -1)
        recv_weights = scatter(parts[-1], 0.0) if state.has_weights else None
        recv_slot = scatter(slot_id.unsqueeze(1), -1).squeeze(1)
        handle = HTHandle(
            send_pos=state.send_pos,
            recv_slot=recv_slot,
            recv_counts=state.recv_counts.device.to(torch.int32),
            recv_topk_idx=recv_idx,
        )
        return HTDispatchOutput(
            x=recv_x,
            scales=recv_scales,
            topk_idx=recv_idx,
            topk_weights=recv_weights,
            num_recv=used.to(torch.int32),
            expert_counts=expert_counts.to(torch.int32),
            handle=handle,
        )

    def _message_of_rows(self, handle: HTHandle, messages: int) -> torch.Tensor:
        """Index of the message each row holds; ``messages`` (a spare) for rows holding none."""
        t = self.cfg.max_tokens_per_rank
        counts = handle.recv_counts.long()
        starts = torch.cumsum(counts, 0) - counts
        slot_id = handle.recv_slot.long()
        message = starts[(slot_id // t).clamp(0, counts.numel() - 1)] + slot_id % t
        return torch.where(slot_id >= 0, message, messages)

    def dispatch(
        self,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor | None,
        layout: str,
        alignment: int,
        *,
        separate_storage: bool = False,
    ) -> HTDispatchOutput:
        """``separate_storage``: taken for the CUDA backend's interface; these outputs always have
        their own storage."""
        return self.dispatch_recv(self.dispatch_send(x, x_scales, topk_idx, topk_weights, layout, alignment))

    def combine(
        self, x: torch.Tensor, handle: HTHandle, topk_weights: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.combine_recv(self.combine_send(x, handle, topk_weights))

    def dispatch_cached(self, x: torch.Tensor, handle: HTHandle) -> torch.Tensor:
        """Route ``x [B, ...]`` (e.g. gradients) along an earlier dispatch: ``[N, ...]``, zeros on
        rows that hold no token. No counts are exchanged: the handle has them."""
        mask = handle.send_pos >= 0
        counts = torch.cat([mask.sum(dim=0).to(torch.int32), handle.recv_counts]).tolist()  # one sync
        ranks = handle.recv_counts.numel()
        send_counts, recv_counts = counts[:ranks], counts[ranks:]
        call, _ = self.exchange.start("ht_dispatch_cached", send_counts, recv_counts)
        pairs = torch.nonzero_static(mask.t(), size=sum(send_counts))  # by destination, then slot
        rest = tuple(x.shape[1:])
        rows = self.exchange.rows(
            "ht_dispatch_cached", call, as_bytes(x[pairs[:, 1]]), send_counts, recv_counts
        ).wait()
        messages = rows.view(x.dtype).reshape(rows.shape[0], *rest)
        spare = torch.zeros((1, *rest), dtype=x.dtype, device=x.device)  # rows holding no token
        return torch.cat([messages, spare])[self._message_of_rows(handle, messages.shape[0])]

    def combine_send(
        self, x: torch.Tensor, handle: HTHandle, topk_weights: torch.Tensor | None
    ) -> HTCombineInFlight:
        hidden = x.shape[1]
        back_counts = (handle.send_pos >= 0).sum(dim=0).to(torch.int32)
        counts = torch.cat([handle.recv_counts, back_counts]).tolist()  # the one host sync
        ranks = handle.recv_counts.numel()
        slot_counts, back_host = counts[:ranks], counts[ranks:]
        call, _ = self.exchange.start("ht_combine", slot_counts, back_host)
        messages = sum(slot_counts)
        # rows holding none add into a spare; x may stop before the rows past the used ones
        n = x.shape[0]
        message = self._message_of_rows(handle, messages)[:n]
        partial = torch.zeros((messages + 1, hidden), dtype=torch.float32, device=x.device)
        partial.index_add_(0, message, x.float())
        parts = [partial[:messages].to(torch.bfloat16)]
        topk = None
        if topk_weights is not None:
            topk = topk_weights.shape[1]
            masked = torch.where(handle.recv_topk_idx[:n] >= 0, topk_weights, 0.0)
            partial_w = torch.zeros((messages + 1, topk), dtype=torch.float32, device=x.device)
            partial_w.index_add_(0, message, masked)
            parts.append(partial_w[:messages])
        pending = self.exchange.rows("ht_combine", call, pack_rows(parts), slot_counts, back_host)
        return HTCombineInFlight(pending, back_counts, handle.send_pos, hidden, topk)

    def combine_recv(self, state: HTCombineInFlight) -> tuple[torch.Tensor, torch.Tensor | None]:
        specs: list[tuple[torch.dtype, tuple[int, ...]]] = [(torch.bfloat16, (state.hidden,))]
        if state.topk is not None:
            specs.append((torch.float32, (state.topk,)))
        parts = unpack_rows(state.rows.wait(), specs)
        total = sum_over_ranks(parts[0], state.send_pos, state.back_counts)
        total_w = None
        if state.topk is not None:
            total_w = sum_over_ranks(parts[1], state.send_pos, state.back_counts)
        return total.to(torch.bfloat16), total_w
