"""``torch.ops.ncclep.*``: the four ops as torch custom ops with fake (meta) kernels.

The schemas live here, in Python, so that they exist on every install, the pure-Python one
included; each op finds its group by integer id and runs that group's backend. Handles travel as
their tensors (see :mod:`ncclep.handles`). Output shapes depend only on the group's sizes and the
input shapes, which is what lets ``torch.compile`` trace the ops and CUDA graphs capture them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import fp8
from .group import get_group
from .handles import HTHandle, LLHandle

LLDispatchTensors = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
HTDispatchTensors = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _none_as_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return torch.empty(0, dtype=torch.float32, device=like.device) if t is None else t


# --------------------------------------------------------------------------------------- LL


@torch.library.custom_op("ncclep::ll_dispatch", mutates_args=())
def ll_dispatch(
    group: int, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, use_fp8: bool, ue8m0: bool
) -> LLDispatchTensors:
    """-> (x, scales (empty without fp8), expert_counts, send_slots, recv_rows, recv_weights,
    recv_slot_counts)"""
    out = get_group(group)._ll.dispatch(x, topk_idx, topk_weights, use_fp8, ue8m0)
    return (out.x, _none_as_empty(out.scales, x), out.expert_counts, *out.handle.tensors())


@ll_dispatch.register_fake
def _(group: int, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, use_fp8: bool, ue8m0: bool):
    cfg = get_group(group).config
    experts, rows, hidden = cfg.num_local_experts, cfg.ll_rows_per_expert, x.shape[1]
    ranks, slots, kmax = cfg.world_size, cfg.max_tokens_per_rank, cfg.max_topk
    if use_fp8:
        recv_x = x.new_empty((experts, rows, hidden), dtype=fp8.FP8_DTYPE)
        scale_dtype = fp8.UE8M0_DTYPE if ue8m0 else torch.float32
        scales = x.new_empty((experts, rows, hidden // fp8.BLOCK), dtype=scale_dtype)
    else:
        recv_x = x.new_empty((experts, rows, hidden))
        scales = x.new_empty((0,), dtype=torch.float32)
    return (
        recv_x,
        scales,
        x.new_empty((experts,), dtype=torch.int32),
        x.new_empty((x.shape[0], ranks), dtype=torch.int32),
        x.new_empty((ranks, slots, kmax), dtype=torch.int32),
        x.new_empty((ranks, slots, kmax), dtype=torch.float32),
        x.new_empty((ranks,), dtype=torch.int32),
    )


def _ll_combine(group: int, expert_out: Tensor, handle: LLHandle, out: Tensor | None) -> Tensor:
    return get_group(group)._ll.combine(expert_out, handle, out)


@torch.library.custom_op("ncclep::ll_combine", mutates_args=())
def ll_combine(
    group: int,
    expert_out: Tensor,
    send_slots: Tensor,
    recv_rows: Tensor,
    recv_weights: Tensor,
    recv_slot_counts: Tensor,
) -> Tensor:
    handle = LLHandle(send_slots, recv_rows, recv_weights, recv_slot_counts)
    return _ll_combine(group, expert_out, handle, None)


@ll_combine.register_fake
def _(group, expert_out, send_slots, recv_rows, recv_weights, recv_slot_counts):  # type: ignore[no-untyped-def]
    return expert_out.new_empty((send_slots.shape[0], expert_out.shape[2]))


@torch.library.custom_op("ncclep::ll_combine_out", mutates_args=("out",))
def ll_combine_out(
    group: int,
    expert_out: Tensor,
    send_slots: Tensor,
    recv_rows: Tensor,
    recv_weights: Tensor,
    recv_slot_counts: Tensor,
    out: Tensor,
) -> None:
    handle = LLHandle(send_slots, recv_rows, recv_weights, recv_slot_counts)
    _ll_combine(group, expert_out, handle, out)


@ll_combine_out.register_fake
def _(group, expert_out, send_slots, recv_rows, recv_weights, recv_slot_counts, out):  # type: ignore[no-untyped-def]
    return None


# --------------------------------------------------------------------------------------- HT

LAYOUT_NAMES = ("flat", "expert_major")


@torch.library.custom_op("ncclep::ht_dispatch", mutates_args=())
def ht_dispatch(
    group: int,
    x: Tensor,
    x_scales: Tensor | None,
    topk_idx: Tensor,
    topk_weights: Tensor | None,
    layout: str,
    alignment: int,
) -> HTDispatchTensors:
    """-> (x, scales, topk_idx, topk_weights, num_recv, expert_counts, send_pos, recv_slot,
    recv_counts); scales and topk_weights are empty when not given."""
    backend = get_group(group)._ht
    out = backend.dispatch_recv(backend.dispatch_send(x, x_scales, topk_idx, topk_weights, layout, alignment))
    h = out.handle
    return (
        out.x,
        _none_as_empty(out.scales, x),
        out.topk_idx,
        _none_as_empty(out.topk_weights, x),
        out.num_recv,
        out.expert_counts,
        h.send_pos,
        h.recv_slot,
        h.recv_counts,
    )


@ht_dispatch.register_fake
def _(group, x, x_scales, topk_idx, topk_weights, layout, alignment):  # type: ignore[no-untyped-def]
    cfg = get_group(group).config
    tokens, hidden = x.shape
    topk = topk_idx.shape[1]
    rows = cfg.ht_num_rows(topk, layout, alignment)
    scales = (
        x.new_empty((rows, x_scales.shape[1]), dtype=x_scales.dtype)
        if x_scales is not None
        else x.new_empty((0,), dtype=torch.float32)
    )
    weights = (
        x.new_empty((rows, topk), dtype=torch.float32)
        if topk_weights is not None
        else x.new_empty((0,), dtype=torch.float32)
    )
    return (
        x.new_empty((rows, hidden)),
        scales,
        x.new_empty((rows, topk), dtype=torch.int32),
        weights,
        x.new_empty((1,), dtype=torch.int32),
        x.new_empty((cfg.num_local_experts,), dtype=torch.int32),
        x.new_empty((tokens, cfg.world_size), dtype=torch.int32),
        x.new_empty((rows,), dtype=torch.int32),
        x.new_empty((cfg.world_size,), dtype=torch.int32),
    )


@torch.library.custom_op("ncclep::ht_combine", mutates_args=())
def ht_combine(
    group: int,
    x: Tensor,
    send_pos: Tensor,
    recv_slot: Tensor,
    recv_counts: Tensor,
    recv_topk_idx: Tensor,
    topk_weights: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """-> (out [B, H], combined topk_weights [B, K] or empty)."""
    backend = get_group(group)._ht
    handle = HTHandle(send_pos, recv_slot, recv_counts, recv_topk_idx)
    out, weights = backend.combine_recv(backend.combine_send(x, handle, topk_weights))
    return out, _none_as_empty(weights, x)


@ht_combine.register_fake
def _(group, x, send_pos, recv_slot, recv_counts, recv_topk_idx, topk_weights):  # type: ignore[no-untyped-def]
    out = x.new_empty((send_pos.shape[0], x.shape[1]))
    if topk_weights is None:
        return out, x.new_empty((0,), dtype=torch.float32)
    return out, x.new_empty((send_pos.shape[0], topk_weights.shape[1]), dtype=torch.float32)


@torch.library.custom_op("ncclep::ht_dispatch_cached", mutates_args=())
def ht_dispatch_cached(
    group: int, x: Tensor, send_pos: Tensor, recv_slot: Tensor, recv_counts: Tensor
) -> Tensor:
    """Route ``x [B, ...]`` along an earlier HT dispatch (its handle): ``[N, ...]``, zeros on rows
    that hold no token. The backward of ``ht_combine``."""
    handle = HTHandle(send_pos, recv_slot, recv_counts, recv_slot.new_empty((0, 0)))
    return get_group(group)._ht.dispatch_cached(x, handle)


@ht_dispatch_cached.register_fake
def _(group, x, send_pos, recv_slot, recv_counts):  # type: ignore[no-untyped-def]
    return x.new_empty((recv_slot.shape[0], *x.shape[1:]))
