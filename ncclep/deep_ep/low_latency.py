"""DeepEP's LL ops on ncclep LL groups: ``low_latency_dispatch`` and ``low_latency_combine``.

No host synchronisation anywhere on this path (no ``.item()``, ``.tolist()`` or ``.cpu()``): the
outputs keep DeepEP's fixed shapes and the counts stay on the device, so calls can be captured in
CUDA graphs where ncclep's CUDA backend runs them.

What the shim adds to ncclep's own ops:

* dispatch: weights of ones when the caller gives none (DeepEP's dispatch takes none; a cached
  view), the fp8 scales in DeepEP's layout (column-major, fp32, powers of two with
  ``round_scale``, or with ``use_ue8m0`` packed as int32: ncclep's kernels write them so, no
  copy), and, with ``return_recv_hook``, placeholders that the hook fills.
* combine: the caller's top-k weights handed to ncclep's combine (its kernel sends them to the
  expert ranks first) unless the dispatch carried the same tensor.

Everything that depends only on a call's configuration (the group, the budget check, the output
shapes and layouts) is worked out once per configuration, in an :class:`LLPlan`; a call looks its
plan up by its arguments and does only the per-call work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import fp8, outputs
from ..errors import InvalidArgument, NcclepError
from ..group import Group
from ..handles import LLDispatchOutput
from . import budget, deferred, scales
from .groups import Groups
from .handles import LowLatencyHandle
from .streams import StreamState
from .utils import NO_EVENT

Hook = Callable[[], None]


class LLPlan:
    """What every LL call of one configuration shares: the group, the sizes, the output layouts.

    Arguments:
        group: the LL group of these sizes.
        num_max_dispatch_tokens_per_rank, hidden, num_experts, topk: the sizes.
        use_fp8, round_scale, use_ue8m0: the dispatch's fp8 format (``round_scale`` and
            ``use_ue8m0`` only with ``use_fp8``).
    """

    __slots__ = (
        "_ones",
        "_ones_by_tokens",
        "column_major",
        "combine_shape",
        "cuda",
        "device",
        "group",
        "hidden",
        "index",
        "local",
        "num_experts",
        "num_max_dispatch_tokens_per_rank",
        "round_scale",
        "rows_shape",
        "scales_dtype",
        "scales_shape",
        "topk",
        "use_fp8",
        "use_ue8m0",
    )

    def __init__(
        self,
        group: Group,
        num_max_dispatch_tokens_per_rank: int,
        hidden: int,
        num_experts: int,
        topk: int,
        use_fp8: bool,
        round_scale: bool,
        use_ue8m0: bool,
    ) -> None:
        self.group = group
        self.device = group.device
        self.cuda = group.device.type == "cuda"
        self.index = group.device.index
        self.num_max_dispatch_tokens_per_rank = num_max_dispatch_tokens_per_rank
        self.hidden = hidden
        self.num_experts = num_experts
        self.topk = topk
        self.use_fp8 = use_fp8
        self.round_scale = round_scale and not use_ue8m0
        """Group.ll_dispatch's ``round_scale``: fp32 powers of two (``use_ue8m0`` is its ``ue8m0``)."""
        self.use_ue8m0 = use_ue8m0
        self.column_major = use_fp8
        """Scales column-major, DeepEP's layout (every fp8 format: ncclep's kernels write it)."""
        self.local = group.num_local_experts
        rows = group.config.ll_rows_per_expert
        self.rows_shape = (self.local, rows, hidden)
        self.combine_shape = (self.local, group.world_size * num_max_dispatch_tokens_per_rank, hidden)
        # DeepEP's layout: column-major, fp32 (powers of two with round_scale) or packed UE8M0
        spec = outputs.ll_scales_spec(self.local, rows, hidden, use_ue8m0, column_major=True)
        self.scales_shape, self.scales_dtype, _ = spec  # type: ignore[misc]
        self._ones: torch.Tensor | None = None
        self._ones_by_tokens: dict[int, torch.Tensor] = {}

    def ones(self, tokens: int) -> torch.Tensor:
        """``[tokens, topk]`` fp32 ones: the weights of a dispatch given none (one view per count)."""
        view = self._ones_by_tokens.get(tokens)
        if view is None:
            if self._ones is None:
                shape = (self.num_max_dispatch_tokens_per_rank, self.topk)
                self._ones = torch.ones(shape, dtype=torch.float32, device=self.device)
            view = self._ones_by_tokens[tokens] = self._ones[:tokens]
        return view

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, w: torch.Tensor, send_only: bool) -> Any:
        """The group's ``ll_dispatch`` in this plan's format (``send_only``: a hook's send half)."""
        return self.group.ll_dispatch(
            x, topk_idx, w, self.use_fp8, self.use_ue8m0, send_only, self.column_major, self.round_scale
        )

    def placeholders(self) -> tuple[Any, torch.Tensor]:
        """``(recv_x, recv_count)`` for a hook to fill, as placeholders (:mod:`.deferred`)."""
        count = deferred.placeholder((self.local,), torch.int32, self.device)
        if not self.use_fp8:
            return deferred.placeholder(self.rows_shape, torch.bfloat16, self.device), count
        x = deferred.placeholder(self.rows_shape, fp8.FP8_DTYPE, self.device)
        return (x, deferred.placeholder(self.scales_shape, self.scales_dtype, self.device)), count


class LowLatency:
    """The LL half of a Buffer.

    Arguments:
        groups: the Buffer's groups.
        streams: the Buffer's streams.
        num_rdma_bytes: the byte budget every LL group must fit in.
        world_size: ranks of the Buffer.
        low_latency_mode: the Buffer's flag (LL calls need it).
    """

    def __init__(
        self,
        groups: Groups,
        streams: StreamState,
        num_rdma_bytes: int,
        world_size: int,
        low_latency_mode: bool,
    ) -> None:
        self.groups = groups
        self.low_latency_mode = low_latency_mode
        self.streams = streams
        self.num_rdma_bytes = num_rdma_bytes
        self.world_size = world_size
        self.plans: dict[tuple[Any, ...], LLPlan] = {}
        self._fits: set[tuple[int, ...]] = set()
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

    def plan(
        self,
        key: tuple[Any, ...],
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        max_tokens: int,
        num_experts: int,
        use_fp8: bool,
        round_scale: bool,
        use_ue8m0: bool,
    ) -> LLPlan:
        """The plan of a dispatch's configuration, made (sizes checked, group made) at its first call."""
        if self.groups.closed:
            raise NcclepError("the Buffer was destroyed")
        if not self.low_latency_mode:
            raise InvalidArgument("low_latency_dispatch needs Buffer(low_latency_mode=True)")
        if not isinstance(max_tokens, int) or max_tokens <= 0:
            raise InvalidArgument(
                f"num_max_dispatch_tokens_per_rank must be a positive int, got {max_tokens!r}"
            )
        if not isinstance(num_experts, int) or num_experts <= 0 or num_experts % self.world_size:
            raise InvalidArgument(
                f"num_experts must be a positive multiple of the {self.world_size} ranks, got {num_experts!r}"
            )
        if x.dim() != 2 or topk_idx.dim() != 2:
            raise InvalidArgument(
                f"x must be [num_tokens, hidden] and topk_idx [num_tokens, num_topk], got "
                f"{list(x.shape)} and {list(topk_idx.shape)}"
            )
        hidden, topk = x.shape[1], topk_idx.shape[1]
        if use_fp8 and use_ue8m0 and hidden % (fp8.BLOCK * scales.PACK):
            raise InvalidArgument(f"use_ue8m0=True needs hidden divisible by 512, got {hidden}")
        self.check_budget(num_experts, max_tokens, hidden, topk)
        group = self.groups.ll_group(x.device, num_experts, max_tokens, hidden, topk)
        plan = LLPlan(
            group, max_tokens, hidden, num_experts, topk, bool(use_fp8), bool(round_scale), bool(use_ue8m0)
        )
        self.plans[key] = plan
        return plan

    # ------------------------------------------------------------------------------ dispatch

    def dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        max_tokens: int,
        num_experts: int,
        stats: torch.Tensor | None,
        wait_stats: torch.Tensor | None,
        use_fp8: bool,
        round_scale: bool,
        use_ue8m0: bool,
        async_finish: bool,
        return_recv_hook: bool,
        topk_weights: torch.Tensor | None,
    ) -> tuple[Any, torch.Tensor, LowLatencyHandle, Any, Hook | None]:
        """``Buffer.low_latency_dispatch`` (its arguments, in its order)."""
        if wait_stats is not None:
            raise InvalidArgument("dispatch_wait_recv_cost_stats: ncclep does not time per-rank waits")
        if async_finish and return_recv_hook:
            raise InvalidArgument("async_finish and return_recv_hook cannot both be set")
        if not use_fp8:
            round_scale = use_ue8m0 = False
        elif use_ue8m0 and not round_scale:
            raise InvalidArgument("use_ue8m0=True needs round_scale=True")
        shape = x.shape
        key = (
            max_tokens,
            num_experts,
            shape[-1],
            topk_idx.shape[-1],
            x.is_cuda,
            use_fp8,
            round_scale,
            use_ue8m0,
        )
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plan(key, x, topk_idx, max_tokens, num_experts, use_fp8, round_scale, use_ue8m0)
        if stats is not None and (stats.dtype != torch.int32 or stats.shape != (plan.local,)):
            raise InvalidArgument(
                f"cumulative_local_expert_recv_stats must be torch.int [{plan.local}], "
                f"got {stats.dtype} {list(stats.shape)}"
            )
        tokens = shape[0]
        if topk_weights is None:
            weights = plan._ones_by_tokens.get(tokens)
            if weights is None:
                weights = plan.ones(tokens)
        else:
            weights = topk_weights.contiguous()
        x, topk_idx = x.contiguous(), topk_idx.contiguous()  # callers may pass views
        if return_recv_hook:
            return self._dispatch_hooked(plan, x, topk_idx, stats, weights, topk_weights)
        streams = self.streams
        if async_finish:
            return self._dispatch_async(plan, x, topk_idx, stats, weights, topk_weights)
        # The common call, kept short: its host time is the shim's cost (docs/deep_ep.md, Cost).
        cuda = plan.cuda
        if cuda:
            streams.before(plan.index)
        out = plan.dispatch(x, topk_idx, weights, False)
        if stats is None and not plan.use_fp8:
            recv_x, recv_count = out[0], out[2]
        else:
            recv_x, recv_count = self._outputs(plan, out, stats)  # type: ignore[arg-type]
        if cuda and streams.record:
            streams.after(plan.index)
        return recv_x, recv_count, LowLatencyHandle(plan, tokens, out[3], topk_weights), NO_EVENT, None

    def _dispatch_async(
        self,
        plan: LLPlan,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        stats: torch.Tensor | None,
        weights: torch.Tensor,
        topk_weights: torch.Tensor | None,
    ) -> tuple[Any, torch.Tensor, LowLatencyHandle, Any, None]:
        """An ``async_finish`` dispatch: on the communication stream, with its event."""
        streams = self.streams
        launch = streams.enter(plan.cuda, plan.index, None, True)
        try:
            out = plan.dispatch(x, topk_idx, weights, False)
            recv_x, recv_count = self._outputs(plan, out, stats)  # type: ignore[arg-type]
            event = streams.finish(
                launch, plan.cuda, plan.index, (x, topk_idx, weights, stats), (recv_x, recv_count, out[3])
            )
        finally:
            if launch is not None:
                launch.__exit__()
        return recv_x, recv_count, LowLatencyHandle(plan, x.shape[0], out[3], topk_weights), event, None

    @staticmethod
    def _outputs(plan: LLPlan, out: LLDispatchOutput, stats: torch.Tensor | None) -> tuple[Any, torch.Tensor]:
        """ncclep's LL outputs as DeepEP returns them: ``(recv_x or (recv_x, scales), recv_count)``."""
        recv_count = out[2]
        if stats is not None:
            stats.add_(recv_count)
        if not plan.use_fp8:
            return out[0], recv_count
        return (out[0], out[1]), recv_count

    def _dispatch_hooked(
        self,
        plan: LLPlan,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        stats: torch.Tensor | None,
        weights: torch.Tensor,
        topk_weights: torch.Tensor | None,
    ) -> tuple[Any, torch.Tensor, LowLatencyHandle, Any, Hook]:
        streams = self.streams
        if plan.cuda:
            streams.before(plan.index)
        pending = plan.dispatch(x, topk_idx, weights, True)
        if streams.record and plan.cuda:
            streams.after(plan.index)
        handle = LowLatencyHandle(plan, x.shape[0], None, topk_weights)
        early: LLDispatchOutput | None = pending.early  # type: ignore[union-attr]
        if early is not None:  # the receive half fills these: hand them out now, as DeepEP does
            return self._dispatch_hooked_early(plan, pending, early, handle, stats)
        later_x, later_count = plan.placeholders()

        def receive() -> None:
            out: LLDispatchOutput = pending.wait()  # type: ignore[union-attr]
            if plan.use_fp8:
                deferred.fulfil(later_x[0], out[0])
                deferred.fulfil(later_x[1], out[1])
            else:
                deferred.fulfil(later_x, out[0])
            deferred.fulfil(later_count, out[2])
            handle.routing = out[3]
            if stats is not None:
                stats.add_(out[2])

        return later_x, later_count, handle, NO_EVENT, _hook(streams, plan, receive)

    def _dispatch_hooked_early(
        self,
        plan: LLPlan,
        pending: Any,
        early: LLDispatchOutput,
        handle: LowLatencyHandle,
        stats: torch.Tensor | None,
    ) -> tuple[Any, torch.Tensor, LowLatencyHandle, Any, Hook]:
        """A hooked dispatch whose outputs exist before its receive half (CUDA backend): they are
        returned at once and the hook only runs the receive half, no placeholders."""
        recv_x: Any = (early.x, early.scales) if plan.use_fp8 else early.x

        def receive() -> None:
            out: LLDispatchOutput = pending.wait()
            handle.routing = out[3]
            if stats is not None:
                stats.add_(out[2])

        return recv_x, early.expert_counts, handle, NO_EVENT, _hook(self.streams, plan, receive)

    # ------------------------------------------------------------------------------ combine

    def next_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """The ``[L, R*T, H]`` bf16 tensor a ``zero_copy`` combine of ``handle``'s sizes reads."""
        plan = handle.plan
        key = (plan.device, *plan.combine_shape)
        if key not in self._combine_buffers:
            self._combine_buffers[key] = torch.empty(
                plan.combine_shape, dtype=torch.bfloat16, device=plan.device
            )
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
        routing = handle.routing
        if routing is None:
            routing = handle.received()  # raises
        plan = handle.plan
        if x.shape != plan.combine_shape:
            shape = plan.combine_shape
            raise InvalidArgument(
                f"x must be [{shape[0]}, {shape[1]}, {shape[2]}] like the dispatch's rows, "
                f"got {list(x.shape)}"
            )
        expected = (handle.num_tokens, plan.topk)
        if topk_idx.shape != expected or topk_weights.shape != expected:
            name, t = ("topk_idx", topk_idx) if topk_idx.shape != expected else ("topk_weights", topk_weights)
            raise InvalidArgument(f"{name} must be {list(expected)} as at the dispatch, got {list(t.shape)}")
        if zero_copy:
            key = (plan.device, *plan.combine_shape)
            if key not in self._combine_buffers:
                raise InvalidArgument(
                    "zero_copy=True needs the rows in get_next_low_latency_combine_buffer(handle)"
                )
            x = self._combine_buffers[key]
        else:
            x = x.contiguous()
        direct = out if out is not None and out.is_contiguous() else None
        given = None if handle.carries(topk_weights) else topk_weights.contiguous()  # None: the dispatch's
        group = plan.group
        if return_recv_hook:
            return self._combine_hooked(plan, group, x, handle, routing, given, out, direct)
        streams = self.streams
        if async_finish:
            launch = streams.enter(plan.cuda, plan.index, None, True)
            try:
                combined = _into(out, group.ll_combine(x, routing, direct, topk_weights=given))  # type: ignore[arg-type]
                inputs = (x, topk_idx, topk_weights, given)  # x and given: the tensors the kernel reads
                event = streams.finish(launch, plan.cuda, plan.index, inputs, (combined,))
            finally:
                if launch is not None:
                    launch.__exit__()
            return combined, event, None
        # The common call, kept short (see dispatch).
        cuda = plan.cuda
        if cuda:
            streams.before(plan.index)
        combined = _into(out, group.ll_combine(x, routing, direct, False, given))  # type: ignore[arg-type]
        if cuda and streams.record:
            streams.after(plan.index)
        return combined, NO_EVENT, None

    def _combine_hooked(
        self,
        plan: LLPlan,
        group: Group,
        expert_out: torch.Tensor,
        handle: LowLatencyHandle,
        routing: Any,
        given: torch.Tensor | None,
        out: torch.Tensor | None,
        direct: torch.Tensor | None,
    ) -> tuple[torch.Tensor, Any, Hook]:
        streams = self.streams
        if plan.cuda:
            streams.before(plan.index)
        pending = group.ll_combine(expert_out, routing, direct, True, given)
        if streams.record and plan.cuda:
            streams.after(plan.index)
        early: torch.Tensor | None = pending.early  # type: ignore[union-attr]
        if out is not None:
            later = out
        elif early is not None:  # the receive half writes into it: hand it out now, as DeepEP does
            later = early
        else:
            later = deferred.placeholder((handle.num_tokens, plan.hidden), torch.bfloat16, plan.device)

        def receive() -> None:
            y: torch.Tensor = pending.wait()  # type: ignore[union-attr]
            if y is later:
                return
            if out is None:
                deferred.fulfil(later, y)
            else:
                out.copy_(y)

        return later, NO_EVENT, _hook(streams, plan, receive)


def _hook(streams: StreamState, plan: LLPlan, receive: Hook) -> Hook:
    """The hook of a ``return_recv_hook`` call: ``receive()`` at its first call (later calls do
    nothing), ordered on the current stream like a call without ``async_finish``."""
    done = False

    def hook() -> None:
        nonlocal done
        if done:
            return
        done = True
        if plan.cuda:
            streams.before(plan.index)
        receive()
        if streams.record and plan.cuda:
            streams.after(plan.index)

    return hook


def _into(out: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    if out is None or y is out:
        return y
    out.copy_(y)
    return out
