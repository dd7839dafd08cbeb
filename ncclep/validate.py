"""Input checks run before anything is launched. Each failure names the argument and the limit."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import LAYOUTS, GroupConfig
from .errors import InvalidArgument
from .fp8 import BLOCK, FP8_DTYPE, UE8M0_DTYPE

INDEX_DTYPES = (torch.int64, torch.int32)


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: Sequence[torch.dtype],
    ndim: int,
    device: torch.device,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InvalidArgument(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise InvalidArgument(f"{name} must have dtype {_names(dtypes)}, got {t.dtype}")
    if t.dim() != ndim:
        raise InvalidArgument(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.get_device() != _index(device) and not _same_device(t.device, device):
        raise InvalidArgument(f"{name} must be on {device}, got {t.device}")
    if not t.is_contiguous():
        raise InvalidArgument(f"{name} must be contiguous")
    return t


def _index(device: torch.device) -> int:
    """``Tensor.get_device()`` of a tensor on ``device`` (cheaper than ``Tensor.device``)."""
    return -1 if device.type == "cpu" else (device.index if device.index is not None else -2)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise InvalidArgument(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def check_tokens(cfg: GroupConfig, x: torch.Tensor) -> None:
    tokens, hidden = x.shape
    if tokens > cfg.max_tokens_per_rank:
        raise InvalidArgument(
            f"x has {tokens} tokens, more than the group's max_tokens_per_rank ({cfg.max_tokens_per_rank})"
        )
    if hidden > cfg.hidden:
        raise InvalidArgument(f"x has hidden size {hidden}, more than the group's hidden ({cfg.hidden})")


def check_routing(
    cfg: GroupConfig,
    tokens: int,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor | None,
    device: torch.device,
) -> None:
    check_tensor("topk_idx", topk_idx, dtypes=INDEX_DTYPES, ndim=2, device=device)
    if topk_idx.shape[0] != tokens:
        raise InvalidArgument(f"topk_idx has {topk_idx.shape[0]} rows but x has {tokens} tokens")
    topk = topk_idx.shape[1]
    if not 1 <= topk <= cfg.max_topk:
        raise InvalidArgument(f"top-k is {topk}; it must be between 1 and max_topk ({cfg.max_topk})")
    if topk_weights is not None:
        check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), ndim=2, device=device)
        check_shape("topk_weights", topk_weights, topk_idx.shape)


def check_expert_ids(cfg: GroupConfig, topk_idx: torch.Tensor) -> None:
    """Range and uniqueness of expert ids. Reads the values: the CUDA path does this on the device."""
    if topk_idx.numel() == 0:
        return
    bad = (topk_idx < -1) | (topk_idx >= cfg.num_experts)
    ordered = topk_idx.sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    any_bad, any_repeated = torch.stack([bad.any(), repeated.any()]).tolist()  # one host sync
    if any_bad:
        value = int(topk_idx[bad][0])
        raise InvalidArgument(
            f"topk_idx holds expert id {value}; ids must be -1 (none) or in [0, {cfg.num_experts})"
        )
    if any_repeated:
        row = int(repeated.any(dim=1).nonzero()[0])
        raise InvalidArgument(f"topk_idx row {row} names the same expert twice")


def validate_ll_dispatch(
    cfg: GroupConfig,
    device: torch.device,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
) -> None:
    check_tensor("x", x, dtypes=(torch.bfloat16,), ndim=2, device=device)
    check_tokens(cfg, x)
    if x.shape[1] % BLOCK:
        raise InvalidArgument(f"LL dispatch needs hidden divisible by {BLOCK}, got {x.shape[1]}")
    if topk_weights is None:  # optional in HT (check_routing lets None through), required here
        raise InvalidArgument("topk_weights must be a torch.Tensor [B, K] float32 for LL dispatch, got None")
    check_routing(cfg, x.shape[0], topk_idx, topk_weights, device)


def validate_ll_combine(
    cfg: GroupConfig, device: torch.device, expert_out: torch.Tensor, hidden: int | None = None
) -> None:
    check_tensor("expert_out", expert_out, dtypes=(torch.bfloat16,), ndim=3, device=device)
    rows = cfg.ll_rows_per_expert
    if expert_out.shape[0] != cfg.num_local_experts or expert_out.shape[1] != rows:
        raise InvalidArgument(
            f"expert_out must have shape ({cfg.num_local_experts}, {rows}, hidden), "
            f"got {tuple(expert_out.shape)}"
        )
    if expert_out.shape[2] > cfg.hidden or expert_out.shape[2] % BLOCK:
        raise InvalidArgument(
            f"expert_out hidden must be a multiple of {BLOCK} up to {cfg.hidden}, got {expert_out.shape[2]}"
        )


def validate_out(name: str, out: torch.Tensor, shape: Sequence[int], device: torch.device) -> None:
    check_tensor(name, out, dtypes=(torch.bfloat16,), ndim=len(shape), device=device)
    check_shape(name, out, shape)


def validate_ht_dispatch(
    cfg: GroupConfig,
    device: torch.device,
    x: torch.Tensor,
    x_scales: torch.Tensor | None,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor | None,
    layout: str,
    alignment: int,
) -> None:
    check_tensor("x", x, dtypes=(torch.bfloat16, FP8_DTYPE), ndim=2, device=device)
    check_tokens(cfg, x)
    if x.dtype == FP8_DTYPE:
        if x.shape[1] % BLOCK:
            raise InvalidArgument(f"fp8 x needs hidden divisible by {BLOCK}, got {x.shape[1]}")
        if x_scales is None:
            raise InvalidArgument("fp8 x needs x_scales [B, H/128]")
        check_tensor("x_scales", x_scales, dtypes=(torch.float32, UE8M0_DTYPE), ndim=2, device=device)
        check_shape("x_scales", x_scales, (x.shape[0], x.shape[1] // BLOCK))
    else:
        if x_scales is not None:
            raise InvalidArgument("x_scales is only for fp8 x")
        if x.shape[1] % 8:
            raise InvalidArgument(f"x needs hidden divisible by 8, got {x.shape[1]}")
    check_routing(cfg, x.shape[0], topk_idx, topk_weights, device)
    if layout not in LAYOUTS:
        raise InvalidArgument(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(alignment, int) or alignment < 1:
        raise InvalidArgument(f"alignment must be a positive int, got {alignment!r}")
    if layout == "flat" and alignment != 1:
        raise InvalidArgument("alignment applies to the expert_major layout only")


def validate_ht_combine(
    cfg: GroupConfig,
    device: torch.device,
    x: torch.Tensor,
    rows: int,
    topk_weights: torch.Tensor | None,
    topk: int,
) -> None:
    check_tensor("x", x, dtypes=(torch.bfloat16,), ndim=2, device=device)
    if x.shape[0] != rows:
        raise InvalidArgument(f"x must have the dispatch's {rows} rows, got {x.shape[0]}")
    if x.shape[1] > cfg.hidden:
        raise InvalidArgument(f"x has hidden size {x.shape[1]}, more than the group's hidden ({cfg.hidden})")
    if topk_weights is not None:
        check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), ndim=2, device=device)
        check_shape("topk_weights", topk_weights, (rows, topk))
