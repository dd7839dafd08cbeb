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

from . import fp8, outputs
from .config import LAYOUT_IDS, GroupConfig
from .device_errors import raise_device_error, reject_in_call
from .errors import CommError, InvalidArgument
from .handles import HTDispatchOutput, HTHandle


@dataclass
class CudaHTDispatch:
    out: HTDispatchOutput


@dataclass
class CudaHTCombine:
    out: torch.Tensor
    weights: torch.Tensor | None


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


class CudaHT:
    def __init__(self, cfg: GroupConfig, rank: int, comm: Any, device: torch.device | None = None) -> None:
        self.cfg = cfg
        self.rank = rank
        self.comm = comm
        self.device = device if device is not None else torch.device("cuda", torch.cuda.current_device())
        self._broke: list[CommError] = []  # the report that broke the group (raise_device_error)
        self.max_row_bytes = int(comm.ht_max_row_bytes())

    def raise_device_error(self) -> None:
        """Raise what a kernel reported (bad input of an earlier call, a peer's rejection of one,
        or a timed-out wait; after that, that the group is broken)."""
        raise_device_error(self.comm, self.cfg, self.rank, self._broke)

    def reject(self, op: str, problem: InvalidArgument, **_call: Any) -> NoReturn:
        """As :meth:`ncclep.cuda_ll.CudaLL.reject`: take part in ``op`` with the reason, no payload."""
        kernel = op if op in ("ht_combine", "ht_dispatch_cached") else "ht_dispatch"
        reject_in_call(self.comm, "ht_combine" if op == "ll_combine" else kernel, problem, self)

    # ------------------------------------------------------------------------------ dispatch

    def dispatch_send(
        self,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor | None,
        layout: str,
        alignment: int,
    ) -> CudaHTDispatch:
        self.raise_device_error()
        dev = x.device
        tokens, hidden = x.shape
        topk = topk_idx.shape[1]
        scale_spec = (x_scales.shape[1], x_scales.dtype) if x_scales is not None else None
        out = outputs.ht_dispatch(
            self.cfg,
            tokens,
            hidden,
            x.dtype,
            scale_spec,
            topk,
            topk_weights is not None,
            layout,
            alignment,
            outputs.allocator(dev),
        )
        handle = out.handle
        rows = out.x.shape[0]
        use_fp8 = x.dtype == fp8.FP8_DTYPE
        self.comm.ht_dispatch(
            tokens,
            hidden,
            topk,
            use_fp8,
            x_scales.element_size() if x_scales is not None else 0,
            _ptr(x),
            _ptr(x_scales),
            _ptr(topk_idx),
            64 if topk_idx.dtype == torch.int64 else 32,
            _ptr(topk_weights),
            LAYOUT_IDS[layout],
            alignment,
            rows,
            _ptr(out.x),
            _ptr(out.scales),
            _ptr(out.topk_idx),
            _ptr(out.topk_weights),
            _ptr(out.num_recv),
            _ptr(out.expert_counts),
            _ptr(handle.send_pos),
            _ptr(handle.recv_slot),
            _ptr(handle.recv_counts),
            _stream(dev),
        )
        return CudaHTDispatch(out)

    def dispatch_recv(self, state: CudaHTDispatch) -> HTDispatchOutput:
        return state.out

    def dispatch_cached(self, x: torch.Tensor, handle: HTHandle) -> torch.Tensor:
        """Route ``x [B, ...]`` along an earlier dispatch: ``[N, ...]``, zeros on rows holding no token."""
        self.raise_device_error()
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
            return out
        x = x.contiguous()
        self.comm.ht_dispatch_cached(
            tokens,
            row_bytes,
            rows,
            _ptr(x),
            _ptr(handle.send_pos),
            _ptr(handle.recv_slot),
            _ptr(out),
            _stream(x.device),
        )
        return out

    # ------------------------------------------------------------------------------ combine

    def combine_send(
        self, x: torch.Tensor, handle: HTHandle, topk_weights: torch.Tensor | None
    ) -> CudaHTCombine:
        self.raise_device_error()
        rows, hidden = x.shape
        tokens = handle.send_pos.shape[0]
        topk = handle.recv_topk_idx.shape[1]
        # hidden % 8 and the weights' shape are checked before (validate.validate_ht_combine)
        new = outputs.allocator(x.device)
        out = outputs.combine(tokens, hidden, new)
        weights = outputs.combined_weights(tokens, topk, new) if topk_weights is not None else None
        self.comm.ht_combine(
            tokens,
            hidden,
            topk,
            rows,
            _ptr(x),
            _ptr(topk_weights),
            _ptr(handle.send_pos),
            _ptr(handle.recv_slot),
            _ptr(handle.recv_counts),
            _ptr(handle.recv_topk_idx),
            _ptr(out),
            _ptr(weights),
            _stream(x.device),
        )
        return CudaHTCombine(out, weights)

    def combine_recv(self, state: CudaHTCombine) -> tuple[torch.Tensor, torch.Tensor | None]:
        return state.out, state.weights
