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
from .device_errors import raise_device_error
from .errors import InvalidArgument, NcclepError
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


def _ll_hidden(cfg: GroupConfig, like: Any) -> int:
    """The hidden size of a rejected combine's stand-in: the caller's where it is valid."""
    if isinstance(like, torch.Tensor) and like.dim() == 3:
        hidden = int(like.shape[2])
        if 0 < hidden <= cfg.hidden and hidden % 128 == 0:
            return hidden
    return cfg.hidden


class CudaLL:
    def __init__(self, cfg: GroupConfig, rank: int, comm: Any, device: torch.device | None = None) -> None:
        self.cfg = cfg
        self.rank = rank
        self.comm = comm
        self.device = device if device is not None else torch.device("cuda", torch.cuda.current_device())
        c = _native.module()
        self.phase_send, self.phase_recv, self.phase_all = c.PHASE_SEND, c.PHASE_RECV, c.PHASE_ALL

    def raise_device_error(self) -> None:
        """Raise what a kernel reported (bad input of an earlier call, or a timed-out wait)."""
        raise_device_error(self.comm, self.cfg, self.rank)

    def reject(
        self,
        op: str,
        problem: InvalidArgument,
        *,
        handle: LLHandle | None = None,
        like: Any = None,
        **_call: Any,
    ) -> NoReturn:
        """This rank's input of ``op`` was rejected on the host: keep the peers' kernels paired
        with a stand-in launch, then raise ``problem``.

        The kernels carry no error code to the peers yet, so the peers do NOT raise for this
        call on the CUDA path (the reference backend's peers raise CommError naming this rank):

        - dispatch: this rank sends ZERO TOKENS; the peers' dispatch returns without any token of
          this rank (their next combine then waits for this rank, which has no handle, until
          timeout_s, and raises CommError);
        - combine: with a usable handle, this rank returns NaN rows, so the peers' outputs for
          their tokens routed here are NaN (loud rather than silently short); without a usable
          handle nothing can be launched and the peers' combine times out (CommError).
        """
        try:
            self.raise_device_error()  # an earlier call's bad input is read (and cleared) here
        except InvalidArgument:
            pass  # that call already went through; this one's problem is what to raise
        except NcclepError as err:
            raise problem from err  # the group is broken (a sticky device error): no launch
        try:
            if op in ("ll_dispatch", "ht_dispatch"):
                x = torch.empty((0, self.cfg.hidden), dtype=torch.bfloat16, device=self.device)
                idx = torch.empty((0, 1), dtype=torch.int64, device=self.device)
                w = torch.empty((0, 1), dtype=torch.float32, device=self.device)
                self.dispatch(x, idx, w, False, False)  # zero tokens: peers see none from this rank
            elif op == "ll_combine" and handle is not None:
                nan = torch.full(
                    (self.cfg.num_local_experts, self.cfg.ll_rows_per_expert, _ll_hidden(self.cfg, like)),
                    float("nan"),
                    dtype=torch.bfloat16,
                    device=self.device,
                )
                self.combine(nan, handle)  # NaN rows: the peers' tokens routed here come back NaN
        except NcclepError as err:  # the stand-in itself failed: the group is failing
            raise problem from err
        raise problem

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
