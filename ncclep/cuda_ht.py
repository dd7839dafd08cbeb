"""The CUDA backend of the HT ops: output allocation and launches of ``ncclep._C``'s kernels.

Same interface as :class:`ncclep.reference.ReferenceHT`. Each call is one launch sequence (layout
and transfer for dispatch, prepare and transfer for combine) with the send and receive halves in
the same kernels, so ``dispatch_send``/``combine_send`` launch everything and the ``*_recv``
halves return the outputs. No host synchronisation: counts stay on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from . import _native, outputs
from .config import LAYOUT_IDS, GroupConfig
from .device_errors import raise_device_error, recorded_error, reject_in_call
from .errors import CommError, InvalidArgument
from .handles import HTDispatchOutput, HTHandle


@dataclass
class CudaHTDispatch:
    out: HTDispatchOutput


@dataclass
class CudaHTCombine:
    out: torch.Tensor
    weights: torch.Tensor | None


class CudaHT:
    def __init__(self, cfg: GroupConfig, rank: int, comm: Any, device: torch.device | None = None) -> None:
        self.cfg = cfg
        self.rank = rank
        self.comm = comm
        self.device = device if device is not None else torch.device("cuda", torch.cuda.current_device())
        self._broke: list[CommError] = []  # the report that broke the group (raise_device_error)
        self.max_row_bytes = int(comm.ht_max_row_bytes())
        self._c = _native.module()
        self._pending = self._c.DeviceErrorPending
        self._dispatch_plans: dict[tuple[Any, ...], Any] = {}
        self._combine_plans: dict[tuple[int, int, bool], Any] = {}

    def raise_device_error(self) -> None:
        """Raise what a kernel reported (bad input of an earlier call, a peer's rejection of one,
        or a timed-out wait; after that, that the group is broken)."""
        raise_device_error(self.comm, self.cfg, self.rank, self._broke)

    def reject(self, op: str, problem: InvalidArgument, **_call: Any) -> NoReturn:
        """As :meth:`ncclep.cuda_ll.CudaLL.reject`: take part in ``op`` with the reason, no payload."""
        kernel = op if op in ("ht_combine", "ht_dispatch_cached") else "ht_dispatch"
        reject_in_call(self.comm, "ht_combine" if op == "ll_combine" else kernel, problem, self)

    # ------------------------------------------------------------------------------ dispatch

    def _dispatch_plan(
        self,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        topk_idx: torch.Tensor,
        has_weights: bool,
        layout: str,
        alignment: int,
        shared: bool,
    ) -> Any:
        scales = (x_scales.shape[1], x_scales.dtype) if x_scales is not None else None
        key = (x.shape[1], x.dtype, scales, topk_idx.shape[1], topk_idx.dtype, has_weights, layout, alignment)
        plan_key = (*key, shared)
        plan = self._dispatch_plans.get(plan_key)
        if plan is None:
            specs = outputs.ht_dispatch_specs(self.cfg, outputs.TOKENS, *key)
            share_from = outputs.SHARE_AFTER_PAYLOAD if shared else None
            plan = self._dispatch_plans[plan_key] = outputs.plan(
                self._c, self._c.HT_DISPATCH_OUTPUTS, specs, share_from
            )
        return plan

    def dispatch_send(
        self,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor | None,
        layout: str,
        alignment: int,
    ) -> CudaHTDispatch:
        return CudaHTDispatch(self.dispatch(x, x_scales, topk_idx, topk_weights, layout, alignment))

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
        """``separate_storage``: every output its own allocation (a custom op's outputs); else the
        outputs after ``x`` and its scales share one allocation per dtype (``outputs.plan``)."""
        plan = self._dispatch_plan(
            x, x_scales, topk_idx, topk_weights is not None, layout, alignment, not separate_storage
        )
        try:
            out = self.comm.ht_dispatch(
                plan, x, x_scales, topk_idx, topk_weights, LAYOUT_IDS[layout], alignment
            )
        except self._pending as err:
            raise recorded_error(err.args, self.cfg, self.rank, self._broke) from None
        return outputs.ht_dispatch_output(out)

    def dispatch_recv(self, state: CudaHTDispatch) -> HTDispatchOutput:
        return state.out

    def dispatch_cached(self, x: torch.Tensor, handle: HTHandle) -> torch.Tensor:
        """Route ``x [B, ...]`` along an earlier dispatch: ``[N, ...]``, zeros on rows holding no token."""
        tokens = handle.send_pos.shape[0]
        if x.shape[0] != tokens:  # checked before (ops.ht_dispatch_cached); kept for direct callers
            raise InvalidArgument(
                f"x has {x.shape[0]} rows but the handle's dispatch had {tokens} tokens", reason="shape"
            )
        rest = tuple(x.shape[1:])
        row_bytes = math.prod(rest) * x.element_size()
        if row_bytes > self.max_row_bytes:
            # a limit of the kernels: the peers must hear of it like any other bad input
            self.reject(
                "ht_dispatch_cached",
                InvalidArgument(
                    f"dispatch_cached moves rows of at most {self.max_row_bytes} bytes, got {row_bytes}",
                    reason="shape",
                ),
            )
        rows = handle.recv_slot.shape[0]
        out = torch.empty((rows, *rest), dtype=x.dtype, device=x.device)
        if row_bytes == 0:
            self.raise_device_error()
            return out
        try:
            self.comm.ht_dispatch_cached(x.contiguous(), handle.send_pos, handle.recv_slot, out, row_bytes)
        except self._pending as err:
            raise recorded_error(err.args, self.cfg, self.rank, self._broke) from None
        return out

    # ------------------------------------------------------------------------------ combine

    def combine(
        self, x: torch.Tensor, handle: HTHandle, topk_weights: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = x.shape[1]
        topk = handle.recv_topk_idx.shape[1]
        # hidden % 8 and the weights' shape are checked before (validate.Checks.ht_combine)
        key = (hidden, topk, topk_weights is not None)
        plan = self._combine_plans.get(key)
        if plan is None:
            specs = outputs.ht_combine_specs(outputs.TOKENS, *key)
            plan = self._combine_plans[key] = outputs.plan(self._c, self._c.HT_COMBINE_OUTPUTS, specs)
        h = handle
        try:
            out, weights = self.comm.ht_combine(
                plan, x, h.send_pos, h.recv_slot, h.recv_counts, h.recv_topk_idx, topk_weights
            )
        except self._pending as err:
            raise recorded_error(err.args, self.cfg, self.rank, self._broke) from None
        return out, weights

    def combine_send(
        self, x: torch.Tensor, handle: HTHandle, topk_weights: torch.Tensor | None
    ) -> CudaHTCombine:
        return CudaHTCombine(*self.combine(x, handle, topk_weights))

    def combine_recv(self, state: CudaHTCombine) -> tuple[torch.Tensor, torch.Tensor | None]:
        return state.out, state.weights
