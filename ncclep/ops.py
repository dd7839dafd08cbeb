"""``torch.ops.ncclep.*``: the four ops as torch custom ops with fake (meta) kernels.

``ll_dispatch``, ``ll_combine``, ``ll_combine_out``, ``ht_dispatch``, ``ht_combine`` and
``ht_dispatch_cached`` (the backward of ``ht_combine``). Each takes the group as its integer
``Group.id`` and handles as their tensors; dtypes, shapes and errors are those of the
:class:`ncclep.Group` methods of the same names, which validate the inputs and call these ops.

The schemas live here, in Python, so that they exist on every install, the pure-Python one
included; each op finds its group by integer id and runs that group's backend. Handles travel as
their tensors (see :mod:`ncclep.handles`). Output shapes depend only on the group's sizes and the
input shapes, which is what lets ``torch.compile`` trace the ops and CUDA graphs capture them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import outputs, registry
from .errors import InvalidArgument
from .handles import HTDispatchOutput, HTHandle, LLDispatchOutput, LLHandle

LLDispatchTensors = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
HTDispatchTensors = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def eager(*tensors: Tensor | None) -> bool:
    """Whether a call on ``tensors`` may go to the group's backend directly instead of through the
    op: nothing traces it (no torch.compile, no fake tensors or tensor subclasses, no torch
    function or dispatch mode) and no autograd is needed. The backend is what the op runs, so the
    result is the same; the torch dispatcher's tens of µs of host time are not spent."""
    if torch.compiler.is_compiling() or _function_mode_enabled() or _dispatch_modes():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not Tensor or (grad and t.requires_grad)):
            return False
    return True


_function_mode_enabled = torch._C._is_torch_function_mode_enabled
_dispatch_modes = torch._C._len_torch_dispatch_stack


def _fake_allocator(like: Tensor) -> outputs.Allocator:
    """Outputs on ``like``'s device: fake tensors, since a fake kernel runs under the fake mode."""
    return outputs.allocator(like.device)


def _none_as_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return torch.empty(0, dtype=torch.float32, device=like.device) if t is None else t


def _ll_dispatch_tensors(out: LLDispatchOutput, like: Tensor) -> LLDispatchTensors:
    """The op's flat outputs: optional tensors travel as empty ones."""
    return (out.x, _none_as_empty(out.scales, like), out.expert_counts, *out.handle.tensors())  # type: ignore[return-value]


def _ht_dispatch_tensors(out: HTDispatchOutput, like: Tensor) -> HTDispatchTensors:
    h = out.handle
    return (
        out.x,
        _none_as_empty(out.scales, like),
        out.topk_idx,
        _none_as_empty(out.topk_weights, like),
        out.num_recv,
        out.expert_counts,
        h.send_pos,
        h.recv_slot,
        h.recv_counts,
    )


# --------------------------------------------------------------------------------------- LL


@torch.library.custom_op("ncclep::ll_dispatch", mutates_args=())
def ll_dispatch(
    group: int,
    x: Tensor,
    topk_idx: Tensor,
    topk_weights: Tensor,
    use_fp8: bool,
    ue8m0: bool,
    column_major_scales: bool = False,
    round_scale: bool = False,
) -> LLDispatchTensors:
    """``Group.ll_dispatch`` as an op: ``group`` is ``Group.id``; inputs as there (x ``[B, H]``
    bfloat16, topk_idx ``[B, K]`` int64/int32, topk_weights ``[B, K]`` float32).

    Returns ``(x [L, R*T, H] bfloat16 or float8_e4m3fn, scales [L, R*T, H/128] float32 or
    float8_e8m0fnu (empty without fp8; with ``column_major_scales`` laid out as the method
    says), expert_counts [L] int32, send_slots [B, R] int32,
    recv_rows [R, T, Kmax] int32, recv_weights [R, T, Kmax] float32, recv_slot_counts [R] int32)``;
    the last four are the :class:`ncclep.LLHandle`. Raises ``InvalidArgument`` / ``CommError``
    as the method does (the method validates; the op trusts its caller)."""
    backend = registry.lookup(group).backend
    out = backend.dispatch(
        x, topk_idx, topk_weights, use_fp8, ue8m0, column_major_scales, round_scale, separate_storage=True
    )
    return _ll_dispatch_tensors(out, x)


@ll_dispatch.register_fake
def _(
    group: int,
    x: Tensor,
    topk_idx: Tensor,
    topk_weights: Tensor,
    use_fp8: bool,
    ue8m0: bool,
    column_major_scales: bool = False,
    round_scale: bool = False,
):
    cfg = registry.lookup(group).config
    new = _fake_allocator(x)
    out = outputs.ll_dispatch(cfg, x.shape[0], x.shape[1], use_fp8, ue8m0, new, column_major_scales)
    return _ll_dispatch_tensors(out, x)


def _ll_combine(
    group: int, expert_out: Tensor, handle: LLHandle, out: Tensor | None, topk_weights: Tensor | None
) -> Tensor:
    return registry.lookup(group).backend.combine(expert_out, handle, out, topk_weights)


@torch.library.custom_op("ncclep::ll_combine", mutates_args=())
def ll_combine(
    group: int,
    expert_out: Tensor,
    send_slots: Tensor,
    recv_rows: Tensor,
    recv_weights: Tensor,
    recv_slot_counts: Tensor,
    topk_weights: Tensor | None = None,
) -> Tensor:
    """``Group.ll_combine`` as an op: expert_out ``[L, R*T, H]`` bfloat16 and the dispatch's handle
    tensors, optionally the combine's own ``topk_weights [B, K]``; returns ``[B, H]`` bfloat16."""
    handle = LLHandle(send_slots, recv_rows, recv_weights, recv_slot_counts)
    return _ll_combine(group, expert_out, handle, None, topk_weights)


@ll_combine.register_fake
def _(group, expert_out, send_slots, recv_rows, recv_weights, recv_slot_counts, topk_weights=None):  # type: ignore[no-untyped-def]
    return outputs.combine(send_slots.shape[0], expert_out.shape[2], _fake_allocator(expert_out))


@torch.library.custom_op("ncclep::ll_combine_out", mutates_args=("out",))
def ll_combine_out(
    group: int,
    expert_out: Tensor,
    send_slots: Tensor,
    recv_rows: Tensor,
    recv_weights: Tensor,
    recv_slot_counts: Tensor,
    out: Tensor,
    topk_weights: Tensor | None = None,
) -> None:
    """``ll_combine`` writing into ``out [B, H]`` bfloat16 (mutated in place)."""
    handle = LLHandle(send_slots, recv_rows, recv_weights, recv_slot_counts)
    _ll_combine(group, expert_out, handle, out, topk_weights)


@ll_combine_out.register_fake
def _(group, expert_out, send_slots, recv_rows, recv_weights, recv_slot_counts, out, topk_weights=None):  # type: ignore[no-untyped-def]
    return None


# --------------------------------------------------------------------------------------- HT


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
    """``Group.ht_dispatch`` as an op: ``group`` is ``Group.id``; inputs as there.

    Returns ``(x [N, H] (x's dtype), scales [N, H/128] (empty without x_scales), topk_idx [N, K]
    local ids (topk_idx's dtype), topk_weights [N, K] float32 (empty when not given), num_recv [1]
    int32, expert_counts [L] int32, send_pos [B, R] int32, recv_slot [N] int32, recv_counts [R]
    int32)``
    with ``N = group.config.ht_num_rows(K, layout, alignment)``; ``send_pos, recv_slot,
    recv_counts`` and ``topk_idx`` form the :class:`ncclep.HTHandle`."""
    out = registry.lookup(group).backend.dispatch(
        x, x_scales, topk_idx, topk_weights, layout, alignment, separate_storage=True
    )
    return _ht_dispatch_tensors(out, x)


@ht_dispatch.register_fake
def _(group, x, x_scales, topk_idx, topk_weights, layout, alignment):  # type: ignore[no-untyped-def]
    cfg = registry.lookup(group).config
    scales = (x_scales.shape[1], x_scales.dtype) if x_scales is not None else None
    out = outputs.ht_dispatch(
        cfg,
        x.shape[0],
        x.shape[1],
        x.dtype,
        scales,
        topk_idx.shape[1],
        topk_idx.dtype,
        topk_weights is not None,
        layout,
        alignment,
        _fake_allocator(x),
    )
    return _ht_dispatch_tensors(out, x)


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
    """``Group.ht_combine`` as an op: x ``[N, H]`` bfloat16 (or its first rows, when the rest
    hold no token), the handle's four tensors, optional topk_weights ``[N, K]`` float32 (as many
    rows as x). Returns ``(out [B, H] bfloat16, weights [B, K] float32 or
    empty)``."""
    handle = HTHandle(send_pos, recv_slot, recv_counts, recv_topk_idx)
    out, weights = registry.lookup(group).backend.combine(x, handle, topk_weights)
    return out, _none_as_empty(weights, x)


@ht_combine.register_fake
def _(group, x, send_pos, recv_slot, recv_counts, recv_topk_idx, topk_weights):  # type: ignore[no-untyped-def]
    topk = topk_weights.shape[1] if topk_weights is not None else 0
    out, weights = outputs.ht_combine(
        send_pos.shape[0], x.shape[1], topk, topk_weights is not None, _fake_allocator(x)
    )
    return out, _none_as_empty(weights, x)


@torch.library.custom_op("ncclep::ht_dispatch_cached", mutates_args=())
def ht_dispatch_cached(
    group: int, x: Tensor, send_pos: Tensor, recv_slot: Tensor, recv_counts: Tensor
) -> Tensor:
    """Route ``x [B, ...]`` along an earlier HT dispatch (its handle): ``[N, ...]``, zeros on rows
    that hold no token. The backward of ``ht_combine``."""
    entry = registry.lookup(group)
    handle = HTHandle(send_pos, recv_slot, recv_counts, recv_slot.new_empty((0, 0)))
    try:
        entry.checks.ht_dispatch_cached(x, handle)
    except InvalidArgument as problem:  # the peers hear of it (see Group)
        entry.backend.reject("ht_dispatch_cached", problem)
    return entry.backend.dispatch_cached(x, handle)


@ht_dispatch_cached.register_fake
def _(group, x, send_pos, recv_slot, recv_counts):  # type: ignore[no-untyped-def]
    return x.new_empty((recv_slot.shape[0], *x.shape[1:]))


# help(), IDEs and the API docs show each op's own text rather than CustomOpDef's.
for _op in (ll_dispatch, ll_combine, ll_combine_out, ht_dispatch, ht_combine, ht_dispatch_cached):
    _op.__doc__ = _op._init_fn.__doc__
