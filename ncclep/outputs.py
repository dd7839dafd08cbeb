"""Each op's outputs, shaped once for the places that allocate them: the fake (meta) kernels, the
reference backend and the CUDA backend (which hands the shapes to ``ncclep._C`` once per shape key
as an ``OutputPlan`` and allocates in C++). ``new(shape, dtype)`` allocates.

Each ``*_specs`` function maps output names to ``(shape, dtype)`` or ``(shape, dtype, strides)``
(None where the call has no such output); the CUDA backend passes ``tokens=-1``, which the plan
replaces with each call's count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import fp8
from .config import GroupConfig
from .handles import HTDispatchOutput, HTHandle, LLDispatchOutput, LLHandle

Allocator = Callable[..., torch.Tensor]
"""``new(shape, dtype)`` or ``new(shape, dtype, strides)``: an uninitialised tensor."""
Spec = tuple[tuple[Any, ...], torch.dtype] | tuple[tuple[Any, ...], torch.dtype, tuple[int, ...]]
Specs = dict[str, Spec | None]

TOKENS = -1
"""The token count in the specs of a plan: ``ncclep._C.OutputPlan`` puts each call's there."""


def allocator(device: torch.device) -> Allocator:
    def new(
        shape: tuple[int, ...], dtype: torch.dtype, strides: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        if strides is None:
            return torch.empty(shape, dtype=dtype, device=device)
        return torch.empty_strided(shape, strides, dtype=dtype, device=device)

    return new


def allocate(specs: Specs, new: Allocator) -> dict[str, torch.Tensor | None]:
    return {name: None if spec is None else new(*spec) for name, spec in specs.items()}


SHARE_AFTER_PAYLOAD = 2
"""``plan``'s ``share_from`` for an eager dispatch: the rows and their scales (outputs 0 and 1 of
both modes' dispatch; the payload, large, often dropped before the rest) allocated alone, the small
outputs after them (counts, ids, weights, the handle) one allocation per dtype."""


def plan(c: Any, names: Sequence[str], specs: Specs, share_from: int | None = None) -> Any:
    """``ncclep._C.OutputPlan`` of ``specs`` in the order of the C call's outputs (``names``).

    ``share_from``: the outputs from that index on that have one dtype are views of one allocation
    (an allocation costs microseconds of host time, a view a fraction of one). Only for calls that
    do not go through a torch custom op, whose outputs may not share storage."""
    if set(names) != set(specs):
        raise AssertionError(f"outputs {sorted(specs)} do not match the C call's {sorted(names)}")
    if share_from == SHARE_AFTER_PAYLOAD and tuple(names[:share_from]) != ("x", "scales"):
        raise AssertionError(f"the payload is not the first outputs of {tuple(names)}")
    return c.OutputPlan([specs[name] for name in names], -1 if share_from is None else share_from)


# --------------------------------------------------------------------------------------- LL


def ll_scales_spec(experts: int, rows: int, hidden: Any, ue8m0: bool, column_major: bool) -> Spec:
    """The LL dispatch's fp8 scales: ``[L, R*T, H/128]`` fp32 or UE8M0 bytes, row-major; or
    ``column_major`` (token dimension innermost), the UE8M0 exponents then packed four to an int32
    word: ``[L, R*T, H/512]`` int32."""
    columns = hidden // fp8.BLOCK
    if not column_major:
        return ((experts, rows, columns), fp8.UE8M0_DTYPE if ue8m0 else torch.float32)
    if ue8m0:
        columns //= fp8.UE8M0_PER_WORD
    strides = (rows * columns, 1, rows if columns > 1 else 1)  # a lone column: as fp8.column_major gives it
    return ((experts, rows, columns), torch.int32 if ue8m0 else torch.float32, strides)


def ll_dispatch_specs(
    cfg: GroupConfig, tokens: Any, hidden: Any, use_fp8: bool, ue8m0: bool, column_major_scales: bool = False
) -> Specs:
    experts, rows = cfg.num_local_experts, cfg.ll_rows_per_expert
    ranks, slots, kmax = cfg.world_size, cfg.max_tokens_per_rank, cfg.max_topk
    scales = ll_scales_spec(experts, rows, hidden, ue8m0, column_major_scales) if use_fp8 else None
    return {
        "x": ((experts, rows, hidden), fp8.FP8_DTYPE if use_fp8 else torch.bfloat16),
        "scales": scales,
        "expert_counts": ((experts,), torch.int32),
        "send_slots": ((tokens, ranks), torch.int32),
        "recv_rows": ((ranks, slots, kmax), torch.int32),
        "recv_weights": ((ranks, slots, kmax), torch.float32),
        "recv_slot_counts": ((ranks,), torch.int32),
    }


def ll_dispatch_output(t: dict[str, Any] | Sequence[Any]) -> LLDispatchOutput:
    """The output tuple from tensors by name, or in the C call's order (``LL_DISPATCH_OUTPUTS``)."""
    if not isinstance(t, dict):
        x, scales, counts, *handle = t
        return LLDispatchOutput(x, scales, counts, LLHandle(*handle))
    handle = LLHandle(t["send_slots"], t["recv_rows"], t["recv_weights"], t["recv_slot_counts"])
    return LLDispatchOutput(t["x"], t["scales"], t["expert_counts"], handle)


def ll_dispatch(
    cfg: GroupConfig,
    tokens: Any,
    hidden: Any,
    use_fp8: bool,
    ue8m0: bool,
    new: Allocator,
    column_major_scales: bool = False,
) -> LLDispatchOutput:
    specs = ll_dispatch_specs(cfg, tokens, hidden, use_fp8, ue8m0, column_major_scales)
    return ll_dispatch_output(allocate(specs, new))


def combine_specs(tokens: Any, hidden: Any) -> Specs:
    """``out [B, H]`` bf16: the output of both modes' combine."""
    return {"out": ((tokens, hidden), torch.bfloat16)}


def combine(tokens: Any, hidden: Any, new: Allocator) -> torch.Tensor:
    out = allocate(combine_specs(tokens, hidden), new)["out"]
    assert out is not None
    return out


# --------------------------------------------------------------------------------------- HT


def ht_dispatch_specs(
    cfg: GroupConfig,
    tokens: Any,
    hidden: Any,
    x_dtype: torch.dtype,
    scales: tuple[Any, torch.dtype] | None,
    topk: Any,
    idx_dtype: torch.dtype,
    has_weights: bool,
    layout: str,
    alignment: Any,
) -> Specs:
    """``scales`` is (columns, dtype) of fp8 inputs' scales, None for bf16; ``idx_dtype`` that of
    the given ``topk_idx``, which the received ids keep. The handle's ``recv_topk_idx`` is the
    ``topk_idx`` output itself."""
    rows = cfg.ht_num_rows(topk, layout, alignment)
    ranks = cfg.world_size
    return {
        "x": ((rows, hidden), x_dtype),
        "scales": ((rows, scales[0]), scales[1]) if scales is not None else None,
        "topk_idx": ((rows, topk), idx_dtype),
        "topk_weights": ((rows, topk), torch.float32) if has_weights else None,
        "num_recv": ((1,), torch.int32),
        "expert_counts": ((cfg.num_local_experts,), torch.int32),
        "send_pos": ((tokens, ranks), torch.int32),
        "recv_slot": ((rows,), torch.int32),
        "recv_counts": ((ranks,), torch.int32),
    }


def ht_dispatch_output(t: dict[str, Any] | Sequence[Any]) -> HTDispatchOutput:
    """The output tuple from tensors by name, or in the C call's order (``HT_DISPATCH_OUTPUTS``)."""
    if not isinstance(t, dict):
        x, scales, idx, weights, num_recv, counts, send_pos, recv_slot, recv_counts = t
        handle = HTHandle(send_pos, recv_slot, recv_counts, idx)
        return HTDispatchOutput(x, scales, idx, weights, num_recv, counts, handle)
    handle = HTHandle(t["send_pos"], t["recv_slot"], t["recv_counts"], t["topk_idx"])
    return HTDispatchOutput(
        t["x"], t["scales"], t["topk_idx"], t["topk_weights"], t["num_recv"], t["expert_counts"], handle
    )


def ht_dispatch(
    cfg: GroupConfig,
    tokens: Any,
    hidden: Any,
    x_dtype: torch.dtype,
    scales: tuple[Any, torch.dtype] | None,
    topk: Any,
    idx_dtype: torch.dtype,
    has_weights: bool,
    layout: str,
    alignment: Any,
    new: Allocator,
) -> HTDispatchOutput:
    specs = ht_dispatch_specs(
        cfg, tokens, hidden, x_dtype, scales, topk, idx_dtype, has_weights, layout, alignment
    )
    return ht_dispatch_output(allocate(specs, new))


def ht_combine_specs(tokens: Any, hidden: Any, topk: Any, has_weights: bool) -> Specs:
    """``out [B, H]`` bf16 and, with weights, their per-token sums ``[B, K]`` float32."""
    return {
        **combine_specs(tokens, hidden),
        "weights": ((tokens, topk), torch.float32) if has_weights else None,
    }


def ht_combine(
    tokens: Any, hidden: Any, topk: Any, has_weights: bool, new: Allocator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    t = allocate(ht_combine_specs(tokens, hidden, topk, has_weights), new)
    out = t["out"]
    assert out is not None
    return out, t["weights"]
