"""The CUDA backend of the LL ops: output allocation and launches of ``ncclep._C``'s kernels.

Same interface as :class:`ncclep.reference.ReferenceLL`. The send and receive halves of a call
are the two phases of one kernel; ``dispatch``/``combine`` launch both phases at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from . import _native, outputs
from .config import GroupConfig
from .device_errors import raise_device_error, reject_in_call
from .errors import CommError, InvalidArgument
from .handles import LLDispatchOutput, LLHandle


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
    def __init__(self, cfg: GroupConfig, rank: int, comm: Any, device: torch.device | None = None) -> None:
        self.cfg = cfg
        self.rank = rank
        self.comm = comm
        self.device = device if device is not None else torch.device("cuda", torch.cuda.current_device())
        self._broke: list[CommError] = []  # the report that broke the group (raise_device_error)
        c = _native.module()
        self.phase_send, self.phase_recv, self.phase_all = c.PHASE_SEND, c.PHASE_RECV, c.PHASE_ALL

    def raise_device_error(self) -> None:
        """Raise what a kernel reported (bad input of an earlier call, a peer's rejection of one,
        or a timed-out wait; after that, that the group is broken)."""
        raise_device_error(self.comm, self.cfg, self.rank, self._broke)

    def reject(self, op: str, problem: InvalidArgument, **_call: Any) -> NoReturn:
        """This rank's input of ``op`` was rejected on the host: take part in the call with the
        reason and no payload (the kernels carry it to every peer, which records it and raises
        CommError naming this rank at a later call or ``check()``), then raise ``problem``."""
        reject_in_call(self.comm, "ll_combine" if op.endswith("combine") else "ll_dispatch", problem, self)

    def _stream(self, device: torch.device) -> int:
        return torch.cuda.current_stream(device).cuda_stream

    # ------------------------------------------------------------------------------ dispatch

    def _dispatch_outputs(self, x: torch.Tensor, use_fp8: bool, ue8m0: bool) -> LLDispatchOutput:
        new = outputs.allocator(x.device)
        return outputs.ll_dispatch(self.cfg, x.shape[0], x.shape[1], use_fp8, ue8m0, new)

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
        self._launch_dispatch(self.phase_all, self._dispatch_args(x, idx, w, use_fp8, ue8m0, out), x.device)
        return out

    def dispatch_send(
        self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, use_fp8: bool, ue8m0: bool
    ) -> CudaLLDispatch:
        self.raise_device_error()
        out = self._dispatch_outputs(x, use_fp8, ue8m0)
        args = self._dispatch_args(x, idx, w, use_fp8, ue8m0, out)
        self._launch_dispatch(self.phase_send, args, x.device)
        return CudaLLDispatch(out, args)

    def dispatch_recv(self, state: CudaLLDispatch) -> LLDispatchOutput:
        self._launch_dispatch(self.phase_recv, state.args, state.out.x.device)
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
        new = outputs.allocator(expert_out.device)
        return outputs.combine(handle.send_slots.shape[0], expert_out.shape[2], new)

    def combine(
        self, expert_out: torch.Tensor, handle: LLHandle, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        self.raise_device_error()
        out = self._combine_out(expert_out, handle, out)
        self.comm.ll_combine(
            self.phase_all, *self._combine_args(expert_out, handle, out), self._stream(out.device)
        )
        return out

    def combine_send(
        self, expert_out: torch.Tensor, handle: LLHandle, out: torch.Tensor | None = None
    ) -> CudaLLCombine:
        self.raise_device_error()
        out = self._combine_out(expert_out, handle, out)
        args = self._combine_args(expert_out, handle, out)
        self.comm.ll_combine(self.phase_send, *args, self._stream(out.device))
        return CudaLLCombine(out, args)

    def combine_recv(self, state: CudaLLCombine, out: torch.Tensor | None = None) -> torch.Tensor:
        self.comm.ll_combine(self.phase_recv, *state.args, self._stream(state.out.device))
        return state.out
