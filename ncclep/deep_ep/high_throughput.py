"""DeepEP's HT ops on ncclep HT groups: ``get_dispatch_layout``, ``dispatch`` (plain and cached)
and ``combine``.

ncclep's HT dispatch (flat layout) returns worst-case rows ``[N, H]``, ``N = R * T``, packed from
the top and ordered by source rank, then token index: the order of DeepEP's intranode dispatch.
The shim returns the first rows, as many as DeepEP would:

* ``num_worst_tokens == 0``: exactly the tokens received, known on the host before the dispatch
  from one gather of the layout counts (:mod:`.counts`), which also agrees on the group's size.
* ``num_worst_tokens > 0``: that many rows, no host synchronisation; the group then takes
  ``ceil(num_worst_tokens / R)`` tokens per rank (or more, if it already had more).

The returned rows are views of ncclep's ``[N, ...]`` outputs. ``combine`` hands the caller's rows
to ncclep as they are: the rows past them hold no token, and ncclep's combine reads no further.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import fp8
from ..errors import InvalidArgument
from ..group import Group
from ..handles import HTHandle
from . import scales
from .counts import gather_exact_sizes
from .groups import Groups
from .handles import DispatchHandle
from .layout import DispatchLayout, dispatch_layout
from .streams import StreamState

Payload = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def _split(x: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(x, tuple):
        if len(x) != 2:
            raise InvalidArgument("x must be a tensor or a (fp8 tensor, scales) tuple")
        return x[0], x[1]
    return x, None


class HighThroughput:
    """The HT half of a Buffer.

    Arguments:
        groups: the Buffer's groups.
        streams: the Buffer's streams.
        rank, world_size: this rank and the ranks of the Buffer.
        num_nodes: nodes the ranks span (consecutive blocks of ranks), for the per-node counts.
    """

    def __init__(
        self, groups: Groups, streams: StreamState, rank: int, world_size: int, num_nodes: int
    ) -> None:
        self.groups = groups
        self.streams = streams
        self.rank = rank
        self.world_size = world_size
        self.num_nodes = num_nodes

    def layout(
        self, topk_idx: torch.Tensor, num_experts: int, previous_event: Any, async_finish: bool
    ) -> tuple[DispatchLayout, Any]:
        if num_experts % self.world_size:
            raise InvalidArgument(
                f"num_experts ({num_experts}) must be divisible by the {self.world_size} ranks"
            )
        streams, index = self.streams, topk_idx.get_device()
        cuda = index >= 0
        launch = streams.enter(cuda, index, previous_event, async_finish)
        try:
            layout = dispatch_layout(topk_idx, num_experts, self.world_size, self.num_nodes)
            event = streams.finish(launch, cuda, index, (topk_idx,), layout)
        finally:
            if launch is not None:
                launch.__exit__()
        return layout, event

    # ------------------------------------------------------------------------------ dispatch

    def dispatch(
        self,
        x: Payload,
        num_tokens_per_rank: torch.Tensor | None,
        is_token_in_rank: torch.Tensor | None,
        num_tokens_per_expert: torch.Tensor | None,
        topk_idx: torch.Tensor | None,
        topk_weights: torch.Tensor | None,
        expert_alignment: int,
        num_worst_tokens: int,
        num_sms: int,
        previous_event: Any,
        async_finish: bool,
    ) -> tuple[Payload, torch.Tensor | None, torch.Tensor | None, list[int], DispatchHandle, Any]:
        data, given_scales = _split(x) if isinstance(x, tuple) else (x, None)
        if num_tokens_per_rank is None or is_token_in_rank is None or num_tokens_per_expert is None:
            raise InvalidArgument(
                "dispatch without a handle needs num_tokens_per_rank, is_token_in_rank and "
                "num_tokens_per_expert (from get_dispatch_layout)"
            )
        if topk_weights is not None and topk_idx is None:
            raise InvalidArgument("topk_weights need topk_idx")
        if not isinstance(expert_alignment, int) or expert_alignment < 1:
            raise InvalidArgument(f"expert_alignment must be a positive int, got {expert_alignment!r}")
        tokens, hidden = data.shape
        num_experts = num_tokens_per_expert.numel()
        ranks = self.world_size
        if is_token_in_rank.shape != (tokens, ranks):
            raise InvalidArgument(
                f"is_token_in_rank must be [{tokens}, {ranks}], got {list(is_token_in_rank.shape)}"
            )
        x_scales, packed = (None, False) if given_scales is None else scales.to_ncclep(data, given_scales)
        if topk_idx is not None:
            routing_idx = topk_idx.contiguous()  # callers may pass views
        else:  # DeepEP routes by is_token_in_rank alone: one choice per rank, its first expert
            first = torch.arange(ranks, device=data.device) * (num_experts // ranks)
            routing_idx = torch.where(is_token_in_rank, first, -1)
        topk = routing_idx.shape[1]
        streams, index = self.streams, data.get_device()
        cuda = index >= 0
        launch = streams.enter(cuda, index, previous_event, async_finish)
        try:
            counts = None
            per_expert: list[int] = []
            if num_worst_tokens == 0:
                sizes = gather_exact_sizes(
                    self.groups.process_group_for(data.device),
                    tokens,
                    num_tokens_per_rank,
                    num_tokens_per_expert,
                    expert_alignment,
                )
                counts, per_expert, rows = sizes.device_counts, sizes.per_expert, sizes.num_recv
                group_tokens = sizes.max_tokens
            else:
                rows = num_worst_tokens
                group_tokens = -(-num_worst_tokens // ranks)
            group = self.groups.ht_group(data, num_experts, group_tokens, hidden, topk, num_sms)
            weights = None if topk_weights is None else topk_weights.contiguous()
            out = group.ht_dispatch(data.contiguous(), routing_idx, weights, x_scales)
            recv_x, recv_scales, recv_idx, recv_weights = out[0], out[1], out[2], out[3]
            if rows != recv_x.shape[0]:  # the first rows of ncclep's worst-case [N, ...]
                recv_x = recv_x[:rows]
                recv_idx = recv_idx[:rows]
                if recv_scales is not None:
                    recv_scales = recv_scales[:rows]
                if recv_weights is not None:
                    recv_weights = recv_weights[:rows]
            payload: Payload = recv_x
            if recv_scales is not None:
                payload = (recv_x, fp8.pack_ue8m0(recv_scales) if packed else recv_scales)
            if topk_idx is None:
                recv_idx = None
            if topk_weights is None:
                recv_weights = None
            handle = DispatchHandle(group, out[6], rows, is_token_in_rank, counts)
            event = streams.finish(
                launch, cuda, index, (data, given_scales, routing_idx, topk_weights), (out[:4], out[6])
            )
        finally:
            if launch is not None:
                launch.__exit__()
        return payload, recv_idx, recv_weights, per_expert, handle, event

    def cached_dispatch(
        self, x: Payload, handle: DispatchHandle, previous_event: Any, async_finish: bool
    ) -> tuple[Payload, Any]:
        """Route ``x`` along ``handle``'s dispatch (no counts exchanged): the backward of combine."""
        data, given_scales = _split(x)
        routing = handle.routing
        tokens = routing.send_pos.shape[0]
        if data.shape[0] != tokens:
            raise InvalidArgument(f"x has {data.shape[0]} tokens but the handle's dispatch had {tokens}")
        x_scales, packed = (None, False) if given_scales is None else scales.to_ncclep(data, given_scales)
        group, rows, streams = handle.group, handle.num_rows, self.streams
        index = data.get_device()
        cuda = index >= 0
        launch = streams.enter(cuda, index, previous_event, async_finish)
        try:
            recv_x: Payload = _route(group, routing, rows, data)
            if x_scales is not None:
                recv_scales = _route(group, routing, rows, x_scales)
                recv_x = (recv_x, fp8.pack_ue8m0(recv_scales) if packed else recv_scales)
            event = streams.finish(launch, cuda, index, (data, given_scales), (recv_x,))
        finally:
            if launch is not None:
                launch.__exit__()
        return recv_x, event

    # ------------------------------------------------------------------------------ combine

    def combine(
        self,
        x: torch.Tensor,
        handle: DispatchHandle,
        topk_weights: torch.Tensor | None,
        bias: tuple[torch.Tensor, ...],
        previous_event: Any,
        async_finish: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        rows = handle.num_rows
        routing = handle.routing
        if x.dim() != 2 or x.shape[0] != rows:
            raise InvalidArgument(f"x must have the dispatch's {rows} rows, got shape {list(x.shape)}")
        if topk_weights is not None and topk_weights.shape[0] != rows:
            raise InvalidArgument(
                f"topk_weights must have the dispatch's {rows} rows, got {list(topk_weights.shape)}"
            )
        streams, index = self.streams, x.get_device()
        cuda = index >= 0
        launch = streams.enter(cuda, index, previous_event, async_finish)
        try:
            # the rows past the dispatch's (its exact size) hold no token: ncclep reads no further
            y, combined_weights = handle.group.ht_combine(
                x.contiguous(), routing, None if topk_weights is None else topk_weights.contiguous()
            )
            if bias:
                y = (y.float() + sum(b.float() for b in bias)).to(torch.bfloat16)
            event = streams.finish(launch, cuda, index, (x, topk_weights, bias), (y, combined_weights))
        finally:
            if launch is not None:
                launch.__exit__()
        return y, combined_weights, event


def _route(group: Group, routing: HTHandle, rows: int, t: torch.Tensor) -> torch.Tensor:
    """``t [B, ...]`` sent along ``routing`` (a cached dispatch on ``group``), as its first ``rows``
    rows. One-byte dtypes travel as uint8 (the reference backend indexes them on the CPU)."""
    single = t.element_size() == 1
    moved = group.ht_dispatch_cached(t.contiguous().view(torch.uint8) if single else t.contiguous(), routing)
    if rows != moved.shape[0]:
        moved = moved[:rows]
    return moved.view(t.dtype) if single else moved


__all__ = ["HighThroughput"]
