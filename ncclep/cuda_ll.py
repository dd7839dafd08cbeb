"""The CUDA backend of the LL ops: output allocation and launches of ``ncclep._C``'s kernels.

Same interface as :class:`ncclep.reference.ReferenceLL`. The send and receive halves of a call
are the two phases of one kernel; ``dispatch``/``combine`` launch both phases at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import fp8
from .config import GroupConfig
from .device_errors import raise_device_error
from .handles import LLDispatchOutput, LLHandle

PHASE_SEND, PHASE_RECV, PHASE_ALL = 1, 2, 3


@dataclass
class CudaLLDispatch:
    out: LLDispatchOutput
    args: tuple[Any, ...]


@dataclass
class CudaLLCombine:
    out: torch.Tensor
    args: tuple[Any, ...]


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class CudaLL:
    def __init__(self, cfg: GroupConfig, rank: int, comm: Any) -> None:
        self.cfg = cfg
        self.rank = rank
        self.comm = comm

    def raise_device_error(self) -> None:
        """Raise what a kernel reported (bad input of an earlier call, or a timed-out wait)."""
        raise_device_error(self.comm, self.cfg, self.rank)

    def _stream(self, device: torch.device) -> int:
        return torch.cuda.current_stream(device).cuda_stream

    # ------------------------------------------------------------------------------ dispatch

    def _dispatch_outputs(self, x: torch.Tensor, use_fp8: bool, ue8m0: bool) -> LLDispatchOutput:
        cfg = self.cfg
        dev = x.device
        experts, rows, hidden = cfg.num_local_experts, cfg.ll_rows_per_expert, x.shape[1]
        ranks, slots, kmax = cfg.world_size, cfg.max_tokens_per_rank, cfg.max_topk
        scales = None
        if use_fp8:
            recv_x = torch.empty((experts, rows, hidden), dtype=fp8.FP8_DTYPE, device=dev)
            scale_dtype = fp8.UE8M0_DTYPE if ue8m0 else torch.float32
            scales = torch.empty((experts, rows, hidden // fp8.BLOCK), dtype=scale_dtype, device=dev)
        else:
            recv_x = torch.empty((experts, rows, hidden), dtype=torch.bfloat16, device=dev)
        handle = LLHandle(
            send_slots=torch.empty((x.shape[0], ranks), dtype=torch.int32, device=dev),
            recv_rows=torch.empty((ranks, slots, kmax), dtype=torch.int32, device=dev),
            recv_weights=torch.empty((ranks, slots, kmax), dtype=torch.float32, device=dev),
            recv_slot_counts=torch.empty((ranks,), dtype=torch.int32, device=dev),
        )
        counts = torch.empty((experts,), dtype=torch.int32, device=dev)
        return LLDispatchOutput(recv_x, scales, counts, handle)

    trace: torch.Tensor | None = None
    """Set to an int64 CUDA tensor [blocks, 16] to record per-block step times (bench/ll_phases.py)."""

    def _launch_dispatch(self, phases: int, args: tuple[Any, ...], device: torch.device) -> None:
        self.comm.ll_dispatch(phases, *args, self._stream(device), _ptr(self.trace))

    def _dispatch_args(
        self,
        x: torch.Tensor,
        idx: torch.Tensor,
        w: torch.Tensor,
        use_fp8: bool,
        ue8m0: bool,
        out: LLDispatchOutput,
    ) -> tuple[Any, ...]:
        h = out.handle
        return (
            x.shape[0],
            x.shape[1],
            idx.shape[1],
            _ptr(x),
            _ptr(idx),
            64 if idx.dtype == torch.int64 else 32,
            _ptr(w),
            use_fp8,
            ue8m0,
            _ptr(out.x),
            _ptr(out.scales),
            _ptr(out.expert_counts),
            _ptr(h.send_slots),
            _ptr(h.recv_rows),
            _ptr(h.recv_weights),
            _ptr(h.recv_slot_counts),
        )

    def dispatch(
        self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, use_fp8: bool, ue8m0: bool
    ) -> LLDispatchOutput:
        self.raise_device_error()
        out = self._dispatch_outputs(x, use_fp8, ue8m0)
        self._launch_dispatch(PHASE_ALL, self._dispatch_args(x, idx, w, use_fp8, ue8m0, out), x.device)
        return out

    def dispatch_send(
        self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, use_fp8: bool, ue8m0: bool
    ) -> CudaLLDispatch:
        self.raise_device_error()
        out = self._dispatch_outputs(x, use_fp8, ue8m0)
        args = self._dispatch_args(x, idx, w, use_fp8, ue8m0, out)
        self._launch_dispatch(PHASE_SEND, args, x.device)
        return CudaLLDispatch(out, args)

    def dispatch_recv(self, state: CudaLLDispatch) -> LLDispatchOutput:
        self._launch_dispatch(PHASE_RECV, state.args, state.out.x.device)
        return state.out

    # ------------------------------------------------------------------------------ combine

    def _combine_args(self, expert_out: torch.Tensor, handle: LLHandle, out: torch.Tensor) -> tuple[Any, ...]:
        return (
            handle.send_slots.shape[0],
            expert_out.shape[2],
            _ptr(expert_out),
            _ptr(handle.send_slots),
            _ptr(handle.recv_rows),
            _ptr(handle.recv_weights),
            _ptr(handle.recv_slot_counts),
            _ptr(out),
        )

    def _combine_out(
        self, expert_out: torch.Tensor, handle: LLHandle, out: torch.Tensor | None
    ) -> torch.Tensor:
        if out is not None:
            return out
        shape = (handle.send_slots.shape[0], expert_out.shape[2])
        return torch.empty(shape, dtype=torch.bfloat16, device=expert_out.device)

    def combine(
        self, expert_out: torch.Tensor, handle: LLHandle, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        self.raise_device_error()
        out = self._combine_out(expert_out, handle, out)
        self.comm.ll_combine(
            PHASE_ALL, *self._combine_args(expert_out, handle, out), self._stream(out.device)
        )
        return out

    def combine_send(
        self, expert_out: torch.Tensor, handle: LLHandle, out: torch.Tensor | None = None
    ) -> CudaLLCombine:
        self.raise_device_error()
        out = self._combine_out(expert_out, handle, out)
        args = self._combine_args(expert_out, handle, out)
        self.comm.ll_combine(PHASE_SEND, *args, self._stream(out.device))
        return CudaLLCombine(out, args)

    def combine_recv(self, state: CudaLLCombine, out: torch.Tensor | None = None) -> torch.Tensor:
        self.comm.ll_combine(PHASE_RECV, *state.args, self._stream(state.out.device))
        return state.out
