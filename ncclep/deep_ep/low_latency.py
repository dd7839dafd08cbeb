"""DeepEP's LL ops on ncclep LL groups: ``low_latency_dispatch`` and ``low_latency_combine``.

No host synchronisation anywhere on this path (no ``.item()``, ``.tolist()`` or ``.cpu()``): the
outputs keep DeepEP's fixed shapes and the counts stay on the device, so calls can be captured in
CUDA graphs where ncclep's CUDA backend runs them.

What the shim adds to ncclep's own ops:

* dispatch: weights of ones when the caller gives none (DeepEP's dispatch takes none), the fp8
  scales in DeepEP's layout (column-major; fp32 powers of two with ``round_scale``; packed int32
  with ``use_ue8m0``), and, with ``return_recv_hook``, placeholders that the hook fills.
* combine: the caller's top-k weights sent to the expert ranks first (:mod:`.weights`) unless the
  dispatch carried the same tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import fp8
from ..errors import InvalidArgument
from ..group import Pending
from ..handles import LLDispatchOutput
from . import budget, deferred, scales
from .groups import Groups
from .handles import LowLatencyHandle
from .streams import Launch, StreamState
from .weights import with_weights

Hook = Callable[[], None]


class LowLatency:
    """The LL half of a Buffer.

    Arguments:
        groups: the Buffer's groups.
        streams: the Buffer's streams.
        num_rdma_bytes: the byte budget every LL group must fit in.
        world_size: ranks of the Buffer.
    """

    def __init__(self, groups: Groups, streams: StreamState, num_rdma_bytes: int, world_size: int) -> None:
        self.groups = groups
        self.streams = streams
        self.num_rdma_bytes = num_rdma_bytes
        self.world_size = world_size
        self._fits: set[tuple[int, ...]] = set()
        self._ones: dict[tuple[Any, ...], torch.Tensor] = {}
        self._combine_buffers: dict[tuple[Any, ...], torch.Tensor] = {}

    # ------------------------------------------------------------------------------ sizing

    def check_budget(self, num_experts: int, max_tokens: int, hidden: int, topk: int) -> None:
        """Refuse sizes whose LL group would not fit in ``num_rdma_bytes``."""
        key = (num_experts, max_tokens, hidden, topk)
        if key in self._fits:
            return
        need = budget.ll_group_bytes(num_experts, max_tokens, hidden, topk, self.world_size)
        if need > self.num_rdma_bytes:
            hint = budget.low_latency_rdma_size_hint(max_tokens, hidden, self.world_size, num_experts)
            raise InvalidArgument(
                f"low_latency_dispatch: {max_tokens} tokens per rank of hidden {hidden}, "
                f"{num_experts} experts and top-k {topk} need an ncclep LL buffer of {need} bytes, "
                f"but the Buffer has num_rdma_bytes={self.num_rdma_bytes}; make it with num_rdma_bytes >= "
                f"Buffer.get_low_latency_rdma_size_hint({max_tokens}, {hidden}, {self.world_size}, "
                f"{num_experts}) = {hint}"
            )
        self._fits.add(key)

    def _ones_for(self, device: torch.device, max_tokens: int, topk: int, tokens: int) -> torch.Tensor:
        key = (device, max_tokens, topk)
        if key not in self._ones:
            self._ones[key] = torch.ones((max_tokens, topk), dtype=torch.float32, device=device)
        return self._ones[key][:tokens]

    # ------------------------------------------------------------------------------ dispatch

    def dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: torch.Tensor | None,
        use_fp8: bool,
        round_scale: bool,
        use_ue8m0: bool,
        async_finish: bool,
        return_recv_hook: bool,
        topk_weights: torch.Tensor | None,
    ) -> tuple[Any, torch.Tensor, LowLatencyHandle, Any, Hook | None]:
        tokens, hidden = x.shape
        topk = topk_idx.shape[1]
        device = x.device
        self.check_budget(num_experts, num_max_dispatch_tokens_per_rank, hidden, topk)
        group = self.groups.ll_group(device, num_experts, num_max_dispatch_tokens_per_rank, hidden, topk)
        weights = (
            topk_weights.contiguous()
            if topk_weights is not None
            else self._ones_for(device, num_max_dispatch_tokens_per_rank, topk, tokens)
        )
        handle = LowLatencyHandle(
            group=group,
            num_max_dispatch_tokens_per_rank=num_max_dispatch_tokens_per_rank,
            hidden=hidden,
            num_experts=num_experts,
            num_tokens=tokens,
            num_topk=topk,
            dispatch_weights=None if topk_weights is None else (topk_weights, topk_weights._version),
        )
        stats = cumulative_local_expert_recv_stats
        with Launch(self.streams, device, None, async_finish) as launch:
            result = group.ll_dispatch(
                x.contiguous(),
                topk_idx.contiguous(),
                weights,
                use_fp8=use_fp8,
                ue8m0=round_scale,
                send_only=return_recv_hook,
            )
            produced: tuple[Any, ...] = ()
            if not return_recv_hook:
                assert isinstance(result, LLDispatchOutput)
                recv_x, recv_count = _deepep_outputs(result, use_fp8, round_scale, use_ue8m0)
                handle.routing = result.handle
                if stats is not None:
                    stats.add_(recv_count)
                produced = (*_flat(recv_x, recv_count), *result.handle.tensors())
            event = launch.finish((x, topk_idx, weights, stats), produced)
        if not return_recv_hook:
            return recv_x, recv_count, handle, event, None

        assert isinstance(result, Pending)
        pending: Pending[LLDispatchOutput] = result
        later_x, later_count = _placeholders(group, hidden, use_fp8, round_scale, use_ue8m0, device)
        done = [False]

        def hook() -> None:
            if done[0]:
                return
            done[0] = True
            out = pending.wait()
            if device.type == "cuda":
                self.streams.note_launch(torch.cuda.current_stream(device))
            recv_x, recv_count = _deepep_outputs(out, use_fp8, round_scale, use_ue8m0)
            for target, value in zip(_flat(later_x, later_count), _flat(recv_x, recv_count), strict=True):
                deferred.fulfil(target, value)
            handle.routing = out.handle
            if stats is not None:
                stats.add_(recv_count)

        return later_x, later_count, handle, event, hook

    # ------------------------------------------------------------------------------ combine

    def next_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """The ``[L, R*T, H]`` bf16 tensor a ``zero_copy`` combine of ``handle``'s sizes reads."""
        group = handle.group
        shape = (
            group.num_local_experts,
            self.world_size * handle.num_max_dispatch_tokens_per_rank,
            handle.hidden,
        )
        key = (group.device, *shape)
        if key not in self._combine_buffers:
            self._combine_buffers[key] = torch.empty(shape, dtype=torch.bfloat16, device=group.device)
        return self._combine_buffers[key]

    def combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle,
        zero_copy: bool,
        async_finish: bool,
        return_recv_hook: bool,
        out: torch.Tensor | None,
    ) -> tuple[torch.Tensor, Any, Hook | None]:
        routing = handle.received()
        group = handle.group
        shape = (
            group.num_local_experts,
            self.world_size * handle.num_max_dispatch_tokens_per_rank,
            handle.hidden,
        )
        if tuple(x.shape) != shape:
            raise InvalidArgument(
                f"x must be [{shape[0]}, {shape[1]}, {shape[2]}] like the dispatch's rows, "
                f"got {list(x.shape)}"
            )
        expected = (handle.num_tokens, handle.num_topk)
        for name, t in (("topk_idx", topk_idx), ("topk_weights", topk_weights)):
            if tuple(t.shape) != expected:
                raise InvalidArgument(
                    f"{name} must be {list(expected)} as at the dispatch, got {list(t.shape)}"
                )
        if topk_weights.dtype != torch.float32:
            raise InvalidArgument(f"topk_weights must be float32, got {topk_weights.dtype}")
        if zero_copy:
            key = (group.device, *shape)
            if key not in self._combine_buffers:
                raise InvalidArgument(
                    "zero_copy=True needs the rows in get_next_low_latency_combine_buffer(handle)"
                )
            expert_out = self._combine_buffers[key]
        else:
            expert_out = x.contiguous()
        direct = out if out is not None and out.is_contiguous() else None
        device = x.device
        with Launch(self.streams, device, None, async_finish) as launch:
            if not handle.carries(topk_weights):
                routing = with_weights(group.process_group, routing, topk_weights)
            result = group.ll_combine(expert_out, routing, out=direct, send_only=return_recv_hook)
            combined = None
            if not return_recv_hook:
                assert isinstance(result, torch.Tensor)
                combined = _into(out, result)
            event = launch.finish((x, topk_idx, topk_weights, expert_out, routing.recv_weights), (combined,))
        if combined is not None:
            return combined, event, None

        assert isinstance(result, Pending)
        pending: Pending[torch.Tensor] = result
        later = (
            out
            if out is not None
            else deferred.placeholder((handle.num_tokens, handle.hidden), torch.bfloat16, device)
        )
        done = [False]

        def hook() -> None:
            if done[0]:
                return
            done[0] = True
            y = pending.wait()
            if device.type == "cuda":
                self.streams.note_launch(torch.cuda.current_stream(device))
            if out is None:
                deferred.fulfil(later, y)
            elif y is not out:
                out.copy_(y)

        return later, event, hook


def _into(out: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    if out is None or y is out:
        return y
    out.copy_(y)
    return out


def _flat(recv_x: Any, recv_count: Any, *more: Any) -> tuple[Any, ...]:
    parts = tuple(recv_x) if isinstance(recv_x, tuple) else (recv_x,)
    return (*parts, recv_count, *more)


def _deepep_outputs(
    out: LLDispatchOutput, use_fp8: bool, round_scale: bool, use_ue8m0: bool
) -> tuple[Any, torch.Tensor]:
    """ncclep's LL outputs as DeepEP returns them: ``(recv_x or (recv_x, scales), recv_count)``."""
    if not use_fp8:
        return out.x, out.expert_counts
    assert out.scales is not None
    if use_ue8m0:
        laid = scales.column_major(scales.pack_ue8m0(out.scales))
    elif round_scale:
        laid = scales.column_major(fp8.scales_to_float(out.scales))
    else:
        laid = scales.column_major(out.scales)
    return (out.x, laid), out.expert_counts


def _placeholders(
    group: Any, hidden: int, use_fp8: bool, round_scale: bool, use_ue8m0: bool, device: torch.device
) -> tuple[Any, torch.Tensor]:
    """Placeholders shaped like :func:`_deepep_outputs` of a dispatch on ``group``."""
    rows = (group.num_local_experts, group.config.ll_rows_per_expert)
    count = deferred.placeholder((group.num_local_experts,), torch.int32, device)
    if not use_fp8:
        return deferred.placeholder((*rows, hidden), torch.bfloat16, device), count
    x = deferred.placeholder((*rows, hidden), fp8.FP8_DTYPE, device)
    blocks = hidden // fp8.BLOCK
    if use_ue8m0:
        s = deferred.placeholder((*rows, blocks // scales.PACK), torch.int32, device)
    else:
        s = deferred.placeholder((*rows, blocks), torch.float32, device)
    return (x, s), count
