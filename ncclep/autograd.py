"""Backward of the HT ops, registered on the custom ops (so it also holds under torch.compile).

Dispatch copies each token to rows on other ranks; its adjoint sums the rows' gradients back per
token, which is a combine with the same handle. Combine sums rows per token; its adjoint copies
each token's gradient to every row it came from, which is a dispatch along the same handle (no
recount: the handle carries the layout). Every rank must run backward in the same order, as it
runs the forward ops.
"""

from __future__ import annotations

from typing import Any

import torch

from . import ops  # noqa: F401  (defines the ops this module attaches to)


def _dispatch_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    group, x, _scales, _idx, weights, _layout, _alignment = inputs
    recv_x, _s, recv_idx, _w, _n, _c, send_pos, recv_slot, recv_counts = output
    ctx.group = group
    ctx.x_differentiable = x.dtype in (torch.bfloat16, torch.float16, torch.float32)
    ctx.has_weights = weights is not None
    ctx.rows_shape = tuple(recv_x.shape)
    ctx.save_for_backward(send_pos, recv_slot, recv_counts, recv_idx)


def _dispatch_backward(ctx: Any, grad_x: torch.Tensor | None, *grads: torch.Tensor | None) -> tuple[Any, ...]:
    grad_weights = grads[2]  # (scales, topk_idx, topk_weights, ...)
    send_pos, recv_slot, recv_counts, recv_idx = ctx.saved_tensors
    want_x = ctx.x_differentiable and ctx.needs_input_grad[1]
    want_w = ctx.has_weights and ctx.needs_input_grad[4]
    if not (want_x or want_w):
        return (None,) * 7
    rows = (
        grad_x
        if grad_x is not None
        else torch.zeros(ctx.rows_shape, dtype=torch.bfloat16, device=send_pos.device)
    )
    w_rows = None
    if want_w:
        w_rows = (
            grad_weights if grad_weights is not None else torch.zeros(recv_idx.shape, device=send_pos.device)
        )
        w_rows = w_rows.contiguous()
    out, out_w = torch.ops.ncclep.ht_combine(
        ctx.group, rows.to(torch.bfloat16).contiguous(), send_pos, recv_slot, recv_counts, recv_idx, w_rows
    )
    return (None, out if want_x else None, None, None, out_w if want_w else None, None, None)


def _combine_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    group, x, send_pos, recv_slot, recv_counts, recv_idx, weights = inputs
    ctx.group = group
    ctx.has_weights = weights is not None
    ctx.rows = x.shape[0]  # the dispatch's N, or fewer (the rows past them hold no token)
    ctx.save_for_backward(send_pos, recv_slot, recv_counts, recv_idx)


def _combine_backward(
    ctx: Any, grad_out: torch.Tensor | None, grad_w: torch.Tensor | None
) -> tuple[Any, ...]:
    send_pos, recv_slot, recv_counts, recv_idx = ctx.saved_tensors
    grad_x = grad_rows_w = None
    if ctx.needs_input_grad[1] and grad_out is not None:
        grad_x = torch.ops.ncclep.ht_dispatch_cached(
            ctx.group, grad_out.contiguous(), send_pos, recv_slot, recv_counts
        )[: ctx.rows]
    if ctx.has_weights and ctx.needs_input_grad[6] and grad_w is not None and grad_w.numel():
        routed = torch.ops.ncclep.ht_dispatch_cached(
            ctx.group, grad_w.contiguous(), send_pos, recv_slot, recv_counts
        )
        grad_rows_w = torch.where(recv_idx[: ctx.rows] >= 0, routed[: ctx.rows], 0.0)
    return (None, grad_x, None, None, None, None, grad_rows_w)


torch.library.register_autograd("ncclep::ht_dispatch", _dispatch_backward, setup_context=_dispatch_setup)
torch.library.register_autograd("ncclep::ht_combine", _combine_backward, setup_context=_combine_setup)
