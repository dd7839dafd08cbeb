"""Each op's outputs, shaped once for the three places that allocate them: the fake (meta)
kernels, the CUDA backend and the reference backend. ``new(shape, dtype)`` allocates."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import fp8
from .config import GroupConfig
from .handles import HTDispatchOutput, HTHandle, LLDispatchOutput, LLHandle

Allocator = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def allocator(device: torch.device) -> Allocator:
    return lambda shape, dtype: torch.empty(shape, dtype=dtype, device=device)


def ll_dispatch(
    cfg: GroupConfig, tokens: int, hidden: int, use_fp8: bool, ue8m0: bool, new: Allocator
) -> LLDispatchOutput:
    experts, rows = cfg.num_local_experts, cfg.ll_rows_per_expert
    ranks, slots, kmax = cfg.world_size, cfg.max_tokens_per_rank, cfg.max_topk
    scales = None
    if use_fp8:
        recv_x = new((experts, rows, hidden), fp8.FP8_DTYPE)
        scale_dtype = fp8.UE8M0_DTYPE if ue8m0 else torch.float32
        scales = new((experts, rows, hidden // fp8.BLOCK), scale_dtype)
    else:
        recv_x = new((experts, rows, hidden), torch.bfloat16)
    handle = LLHandle(
        send_slots=new((tokens, ranks), torch.int32),
        recv_rows=new((ranks, slots, kmax), torch.int32),
        recv_weights=new((ranks, slots, kmax), torch.float32),
        recv_slot_counts=new((ranks,), torch.int32),
    )
    return LLDispatchOutput(recv_x, scales, new((experts,), torch.int32), handle)


def combine(tokens: int, hidden: int, new: Allocator) -> torch.Tensor:
    """``[B, H]`` bf16: the output of both modes' combine."""
    return new((tokens, hidden), torch.bfloat16)


def combined_weights(tokens: int, topk: int, new: Allocator) -> torch.Tensor:
    return new((tokens, topk), torch.float32)


def ht_dispatch(
    cfg: GroupConfig,
    tokens: int,
    hidden: int,
    x_dtype: torch.dtype,
    scales: tuple[int, torch.dtype] | None,
    topk: int,
    has_weights: bool,
    layout: str,
    alignment: int,
    new: Allocator,
) -> HTDispatchOutput:
    """``scales`` is (columns, dtype) of fp8 inputs' scales, None for bf16."""
    rows = cfg.ht_num_rows(topk, layout, alignment)
    ranks = cfg.world_size
    recv_idx = new((rows, topk), torch.int32)
    return HTDispatchOutput(
        x=new((rows, hidden), x_dtype),
        scales=new((rows, scales[0]), scales[1]) if scales is not None else None,
        topk_idx=recv_idx,
        topk_weights=new((rows, topk), torch.float32) if has_weights else None,
        num_recv=new((1,), torch.int32),
        expert_counts=new((cfg.num_local_experts,), torch.int32),
        handle=HTHandle(
            send_pos=new((tokens, ranks), torch.int32),
            recv_slot=new((rows,), torch.int32),
            recv_counts=new((ranks,), torch.int32),
            recv_topk_idx=recv_idx,
        ),
    )
