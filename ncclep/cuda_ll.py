"""The CUDA backend of the LL ops: launches of ``ncclep._C``'s kernels.

Same interface as :class:`ncclep.reference.ReferenceLL`. The send and receive halves of a call
are the two phases of one kernel; ``dispatch``/``combine`` launch both phases at once. Outputs are
allocated in C++ from an ``OutputPlan`` made once per shape key from :mod:`ncclep.outputs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, NoReturn

import torch

from . import _native, outputs
from .config import GroupConfig
from .device_errors import raise_device_error, recorded_error, reject_in_call
from .errors import CommError, InvalidArgument
from .handles import LLDispatchOutput, LLHandle


@dataclass
class CudaLLDispatch:
    out: list[torch.Tensor]
    inputs: tuple[Any, ...]

    @cached_property
    def early(self) -> LLDispatchOutput:
        """The outputs the receive half fills, allocated by the send half (``Pending.early``;
        the receive half returns the same tuple)."""
        return outputs.ll_dispatch_output(self.out)


@dataclass
class CudaLLCombine:
    out: torch.Tensor
    inputs: tuple[Any, ...]

    @property
    def early(self) -> torch.Tensor:
        """The output the receive half fills, allocated by the send half (``Pending.early``)."""
        return self.out


class CudaLL:
    def __init__(self, cfg: GroupConfig, rank: int, comm: Any, device: torch.device | None = None) -> None:
        self.cfg = cfg
        self.rank = rank
        self.comm = comm
        self.device = device if device is not None else torch.device("cuda", torch.cuda.current_device())
        self._broke: list[CommError] = []  # the report that broke the group (raise_device_error)
        c = _native.module()
        self._c = c
        self._pending = c.DeviceErrorPending
        self.phase_send, self.phase_recv, self.phase_all = c.PHASE_SEND, c.PHASE_RECV, c.PHASE_ALL
        self._dispatch_plans: dict[tuple[int, bool, bool, bool, bool], Any] = {}
        self._combine_plans: dict[int, Any] = {}

    def raise_device_error(self) -> None:
        """Raise what a kernel reported (bad input of an earlier call, a peer's rejection of one,
        or a timed-out wait; after that, that the group is broken)."""
        raise_device_error(self.comm, self.cfg, self.rank, self._broke)

    def reject(self, op: str, problem: InvalidArgument, **_call: Any) -> NoReturn:
        """This rank's input of ``op`` was rejected on the host: take part in the call with the
        reason and no payload (the kernels carry it to every peer, which records it and raises
        CommError naming this rank at a later call or ``check()``), then raise ``problem``."""
        reject_in_call(self.comm, "ll_combine" if op.endswith("combine") else "ll_dispatch", problem, self)

    trace: torch.Tensor | None = None
    """Set to an int64 CUDA tensor [blocks, 16] to record per-block step times (bench/ll_phases.py)."""

    # ------------------------------------------------------------------------------ dispatch

    def _dispatch_plan(
        self, hidden: int, use_fp8: bool, ue8m0: bool, column_major_scales: bool, shared: bool
    ) -> Any:
        key = (hidden, use_fp8, ue8m0, column_major_scales, shared)
        plan = self._dispatch_plans.get(key)
        if plan is None:
            specs = outputs.ll_dispatch_specs(
                self.cfg, outputs.TOKENS, hidden, use_fp8, ue8m0, column_major_scales
            )
            share_from = outputs.SHARE_AFTER_PAYLOAD if shared else None
            plan = self._dispatch_plans[key] = outputs.plan(
                self._c, self._c.LL_DISPATCH_OUTPUTS, specs, share_from
            )
        return plan

    def _dispatch(
        self, phases: int, inputs: tuple[Any, ...], out: list[torch.Tensor] | None, shared: bool = True
    ) -> list[torch.Tensor]:
        x, idx, w, use_fp8, ue8m0, column_major_scales, round_scale = inputs
        plan = self._dispatch_plan(x.shape[1], use_fp8, ue8m0, column_major_scales, shared)
        try:
            return self.comm.ll_dispatch(
                plan, x, idx, w, use_fp8, ue8m0, phases, out, self.trace, round_scale
            )
        except self._pending as err:
            raise recorded_error(err.args, self.cfg, self.rank, self._broke) from None

    def dispatch(
        self,
        x: torch.Tensor,
        idx: torch.Tensor,
        w: torch.Tensor,
        use_fp8: bool,
        ue8m0: bool,
        column_major_scales: bool = False,
        round_scale: bool = False,
        *,
        separate_storage: bool = False,
    ) -> LLDispatchOutput:
        """``separate_storage``: every output its own allocation (a custom op's outputs); else the
        outputs after ``x`` and its scales share one allocation per dtype (``outputs.plan``)."""
        inputs = (x, idx, w, use_fp8, ue8m0, column_major_scales, round_scale)
        return outputs.ll_dispatch_output(self._dispatch(self.phase_all, inputs, None, not separate_storage))

    def dispatch_send(
        self,
        x: torch.Tensor,
        idx: torch.Tensor,
        w: torch.Tensor,
        use_fp8: bool,
        ue8m0: bool,
        column_major_scales: bool = False,
        round_scale: bool = False,
    ) -> CudaLLDispatch:
        inputs = (x, idx, w, use_fp8, ue8m0, column_major_scales, round_scale)
        return CudaLLDispatch(self._dispatch(self.phase_send, inputs, None), inputs)

    def dispatch_recv(self, state: CudaLLDispatch) -> LLDispatchOutput:
        self._dispatch(self.phase_recv, state.inputs, state.out)  # fills state.out in place
        return state.early

    # ------------------------------------------------------------------------------ combine

    def _combine(
        self,
        phases: int,
        expert_out: torch.Tensor,
        handle: LLHandle,
        out: torch.Tensor | None,
        topk_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = expert_out.shape[2]
        plan = self._combine_plans.get(hidden)
        if plan is None:
            specs = outputs.combine_specs(outputs.TOKENS, hidden)
            plan = self._combine_plans[hidden] = outputs.plan(self._c, self._c.LL_COMBINE_OUTPUTS, specs)
        h = handle
        try:
            return self.comm.ll_combine(
                plan,
                expert_out,
                h.send_slots,
                h.recv_rows,
                h.recv_weights,
                h.recv_slot_counts,
                phases,
                out,
                topk_weights,
            )
        except self._pending as err:
            raise recorded_error(err.args, self.cfg, self.rank, self._broke) from None

    def combine(
        self,
        expert_out: torch.Tensor,
        handle: LLHandle,
        out: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self._combine(self.phase_all, expert_out, handle, out, topk_weights)

    def combine_send(
        self,
        expert_out: torch.Tensor,
        handle: LLHandle,
        out: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
    ) -> CudaLLCombine:
        out = self._combine(self.phase_send, expert_out, handle, out, topk_weights)
        return CudaLLCombine(out, (expert_out, handle))

    def combine_recv(self, state: CudaLLCombine, out: torch.Tensor | None = None) -> torch.Tensor:
        expert_out, handle = state.inputs
        return self._combine(self.phase_recv, expert_out, handle, state.out)
