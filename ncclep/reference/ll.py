"""Reference LL dispatch and combine: pure PyTorch over torch.distributed.

Dispatch sends each token once to every rank holding one of its experts, with its local expert
ids and weights; the receiver copies it into each chosen expert's rows, ordered by source rank and
then token index. Combine reduces a token's local experts (fp32, weighted) on the expert rank,
sends one bf16 row back per (token, rank), and the owner sums those in rank order in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import fp8
from ..handles import LLDispatchOutput, LLHandle
from .backend import ReferenceBackend
from .exchange import Counts, PendingRows, pack_rows, unpack_rows
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
class LLDispatchInFlight:
    rows: PendingRows
    recv_counts: Counts
    send_slots: torch.Tensor
    hidden: int
    use_fp8: bool
    ue8m0: bool
    column_major_scales: bool
    early: None = None  # the outputs are made by the receive half (see ``Pending.early``)


@dataclass
class LLCombineInFlight:
    rows: PendingRows
    back_counts: torch.Tensor
    send_slots: torch.Tensor
    hidden: int
    out: torch.Tensor | None
    early: None = None  # the output is made by the receive half (see ``Pending.early``)


def _pad_columns(t: torch.Tensor, width: int, value: float) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    pad = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=1)


def _weights_by_destination(
    send_slots: torch.Tensor, back_counts: torch.Tensor, topk_weights: torch.Tensor, max_topk: int, total: int
) -> torch.Tensor:
    """``[total, max_topk]`` fp32: each token's weights once per rank d it went to, grouped by d and
    in slot order there (``back_counts[d]`` tokens went to d, ``total`` in all); no host sync."""
    tokens, ranks = send_slots.shape
    counts = back_counts.long()
    starts = torch.cumsum(counts, 0) - counts
    # the pairs not sent land in a spare row, row `total`, which is cut off
    target = torch.where(send_slots >= 0, starts.unsqueeze(0) + send_slots.long(), total)
    out = torch.zeros((total + 1, max_topk), dtype=torch.float32, device=send_slots.device)
    weights = _pad_columns(topk_weights.float(), max_topk, 0.0)
    out.index_put_((target,), weights.unsqueeze(1).expand(tokens, ranks, max_topk))
    return out[:total]


class ReferenceLL(ReferenceBackend):
    def dispatch_send(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        use_fp8: bool,
        ue8m0: bool,
        column_major_scales: bool = False,
        round_scale: bool = False,
    ) -> LLDispatchInFlight:
        cfg = self.cfg
        problem = rejected(cfg, topk_idx)
        if problem is not None:
            self.exchange.reject("ll_dispatch", problem)
        idx = topk_idx.long()
        mask = destination_mask(idx, cfg.num_local_experts, cfg.world_size)
        token, dest, send_counts, _ = sender_order(mask)
        local = local_choices(idx[token], dest, cfg.num_local_experts)
        weights = torch.where(local >= 0, topk_weights[token], 0.0)
        if use_fp8:
            q, scales = fp8.quantize(x, ue8m0, round_scale)
            payload = [q[token], scales[token]]
        else:
            payload = [x[token]]
        rows = pack_rows(
            [
                *payload,
                _pad_columns(local, cfg.max_topk, -1),
                _pad_columns(weights, cfg.max_topk, 0.0),
            ]
        )
        call, recv_counts = self.exchange.start("ll_dispatch", send_counts)
        return LLDispatchInFlight(
            rows=self.exchange.rows("ll_dispatch", call, rows, send_counts, recv_counts.host),
            recv_counts=recv_counts,
            send_slots=slots_from_mask(mask),
            hidden=x.shape[1],
            use_fp8=use_fp8,
            ue8m0=ue8m0,
            column_major_scales=column_major_scales,
        )

    def dispatch_recv(self, state: LLDispatchInFlight) -> LLDispatchOutput:
        cfg = self.cfg
        hidden, kmax = state.hidden, cfg.max_topk
        rows = state.rows.wait()
        device = rows.device
        specs: list[tuple[torch.dtype, tuple[int, ...]]]
        if state.use_fp8:
            scale_dtype = fp8.UE8M0_DTYPE if state.ue8m0 else torch.float32
            specs = [(fp8.FP8_DTYPE, (hidden,)), (scale_dtype, (hidden // fp8.BLOCK,))]
        else:
            specs = [(torch.bfloat16, (hidden,))]
        specs += [(torch.int32, (kmax,)), (torch.float32, (kmax,))]
        *payload, local, weights = unpack_rows(rows, specs)

        positions, counts = positions_within_expert(local, cfg.num_local_experts)
        rows_per_expert = cfg.ll_rows_per_expert
        valid = local >= 0
        flat_rows = torch.where(valid, local.long() * rows_per_expert + positions, -1)
        experts = cfg.num_local_experts
        outputs = [
            scatter_rows(part, flat_rows, experts * rows_per_expert, None).view(experts, rows_per_expert, -1)
            for part in payload
        ]

        src, slot = message_source(state.recv_counts.device, local.shape[0])
        shape = (cfg.world_size, cfg.max_tokens_per_rank, kmax)
        recv_rows = torch.full(shape, -1, dtype=torch.int32, device=device)
        recv_weights = torch.zeros(shape, dtype=torch.float32, device=device)
        recv_rows[src, slot] = flat_rows.to(torch.int32)
        recv_weights[src, slot] = weights
        handle = LLHandle(
            send_slots=state.send_slots,
            recv_rows=recv_rows,
            recv_weights=recv_weights,
            recv_slot_counts=state.recv_counts.device.to(torch.int32),
        )
        scales = None
        if state.use_fp8:
            scales = outputs[1]
            if state.column_major_scales:  # as outputs.ll_scales_spec lays them out
                scales = fp8.column_major(fp8.pack_ue8m0(scales) if state.ue8m0 else scales)
        return LLDispatchOutput(
            x=outputs[0],
            scales=scales,
            expert_counts=counts.to(torch.int32),
            handle=handle,
        )

    def dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        use_fp8: bool,
        ue8m0: bool,
        column_major_scales: bool = False,
        round_scale: bool = False,
        *,
        separate_storage: bool = False,
    ) -> LLDispatchOutput:
        """``separate_storage``: taken for the CUDA backend's interface; these outputs always have
        their own storage."""
        state = self.dispatch_send(
            x, topk_idx, topk_weights, use_fp8, ue8m0, column_major_scales, round_scale
        )
        return self.dispatch_recv(state)

    def combine(
        self,
        expert_out: torch.Tensor,
        handle: LLHandle,
        out: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.combine_recv(self.combine_send(expert_out, handle, out, topk_weights))

    def combine_send(
        self,
        expert_out: torch.Tensor,
        handle: LLHandle,
        out: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
    ) -> LLCombineInFlight:
        hidden = expert_out.shape[2]
        back_counts = (handle.send_slots >= 0).sum(dim=0).to(torch.int32)
        counts = torch.cat([handle.recv_slot_counts, back_counts]).tolist()  # the one host sync
        ranks = handle.recv_slot_counts.numel()
        slot_counts, back_host = counts[:ranks], counts[ranks:]
        call, _ = self.exchange.start("ll_combine", slot_counts, back_host)
        src, slot = message_source(handle.recv_slot_counts, sum(slot_counts))
        rows = handle.recv_rows[src, slot].long()
        if topk_weights is None:
            weights = handle.recv_weights[src, slot]
        else:  # the token's rank sends each token's weights to the slots it holds, as the kernel does
            send = _weights_by_destination(
                handle.send_slots, back_counts, topk_weights, self.cfg.max_topk, sum(back_host)
            )
            weights = self.exchange.rows("ll_combine", call, send, back_host, slot_counts).wait()
        flat = expert_out.reshape(-1, hidden)
        # where(), not a zero weight: the row read for an empty choice may be padding, and
        # 0 * NaN (uninitialised padding) would poison the token's sum
        weighted = flat[rows.clamp_min(0)].float() * weights.unsqueeze(-1)
        weighted = torch.where((rows >= 0).unsqueeze(-1), weighted, 0.0)
        partial = weighted.sum(dim=1).to(torch.bfloat16)
        pending = self.exchange.rows("ll_combine", call, partial.view(torch.uint8), slot_counts, back_host)
        return LLCombineInFlight(pending, back_counts, handle.send_slots, hidden, out)

    def combine_recv(self, state: LLCombineInFlight, out: torch.Tensor | None = None) -> torch.Tensor:
        out = state.out if out is None else out
        back = state.rows.wait().view(torch.bfloat16).reshape(-1, state.hidden)
        total = sum_over_ranks(back, state.send_slots, state.back_counts)
        if out is None:
            return total.to(torch.bfloat16)
        out.copy_(total)
        return out
