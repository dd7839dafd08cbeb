"""Input checks run before anything is launched. Each failure names the argument and the limit."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import HT_HIDDEN_MULTIPLE, LAYOUTS, GroupConfig
from .errors import InvalidArgument
from .fp8 import BLOCK, FP8_DTYPE, UE8M0_DTYPE
from .handles import HTHandle, LLHandle

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
        raise InvalidArgument(f"{name} must be a torch.Tensor, got {type(t).__name__}", reason="type")
    if t.dtype not in dtypes:
        raise InvalidArgument(f"{name} must have dtype {_names(dtypes)}, got {t.dtype}", reason="dtype")
    if t.dim() != ndim:
        raise InvalidArgument(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}", reason="shape")
    if t.get_device() != _index(device) and not _same_device(t.device, device):
        raise InvalidArgument(f"{name} must be on {device}, got {t.device}", reason="device")
    if not t.is_contiguous():
        raise InvalidArgument(f"{name} must be contiguous", reason="layout")
    return t


def _index(device: torch.device) -> int:
    """``Tensor.get_device()`` of a tensor on ``device`` (cheaper than ``Tensor.device``)."""
    return -1 if device.type == "cpu" else (device.index if device.index is not None else -2)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise InvalidArgument(
            f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}", reason="shape"
        )


def check_tokens(cfg: GroupConfig, x: torch.Tensor) -> None:
    tokens, hidden = x.shape
    if tokens > cfg.max_tokens_per_rank:
        raise InvalidArgument(
            f"x has {tokens} tokens, more than the group's max_tokens_per_rank ({cfg.max_tokens_per_rank})",
            reason="tokens",
        )
    if hidden > cfg.hidden:
        raise InvalidArgument(
            f"x has hidden size {hidden}, more than the group's hidden ({cfg.hidden})", reason="hidden"
        )


def check_routing(
    cfg: GroupConfig,
    tokens: int,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor | None,
    device: torch.device,
) -> None:
    check_tensor("topk_idx", topk_idx, dtypes=INDEX_DTYPES, ndim=2, device=device)
    if topk_idx.shape[0] != tokens:
        raise InvalidArgument(
            f"topk_idx has {topk_idx.shape[0]} rows but x has {tokens} tokens", reason="shape"
        )
    topk = topk_idx.shape[1]
    if not 1 <= topk <= cfg.max_topk:
        raise InvalidArgument(
            f"top-k is {topk}; it must be between 1 and max_topk ({cfg.max_topk})", reason="topk"
        )
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
            f"topk_idx holds expert id {value}; ids must be -1 (none) or in [0, {cfg.num_experts})",
            reason="expert_id",
        )
    if any_repeated:
        row = int(repeated.any(dim=1).nonzero()[0])
        raise InvalidArgument(f"topk_idx row {row} names the same expert twice", reason="duplicate_expert")


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
        raise InvalidArgument(
            f"LL dispatch needs hidden divisible by {BLOCK}, got {x.shape[1]}", reason="hidden"
        )
    if topk_weights is None:  # optional in HT (check_routing lets None through), required here
        raise InvalidArgument(
            "topk_weights must be a torch.Tensor [B, K] float32 for LL dispatch, got None", reason="type"
        )
    check_routing(cfg, x.shape[0], topk_idx, topk_weights, device)


def validate_ll_combine(
    cfg: GroupConfig, device: torch.device, expert_out: torch.Tensor, hidden: int | None = None
) -> None:
    check_tensor("expert_out", expert_out, dtypes=(torch.bfloat16,), ndim=3, device=device)
    rows = cfg.ll_rows_per_expert
    if expert_out.shape[0] != cfg.num_local_experts or expert_out.shape[1] != rows:
        raise InvalidArgument(
            f"expert_out must have shape ({cfg.num_local_experts}, {rows}, hidden), "
            f"got {tuple(expert_out.shape)}",
            reason="shape",
        )
    if expert_out.shape[2] > cfg.hidden or expert_out.shape[2] % BLOCK:
        raise InvalidArgument(
            f"expert_out hidden must be a multiple of {BLOCK} up to {cfg.hidden}, got {expert_out.shape[2]}",
            reason="hidden",
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
            raise InvalidArgument(
                f"fp8 x needs hidden divisible by {BLOCK}, got {x.shape[1]}", reason="hidden"
            )
        if x_scales is None:
            raise InvalidArgument("fp8 x needs x_scales [B, H/128]", reason="type")
        check_tensor("x_scales", x_scales, dtypes=(torch.float32, UE8M0_DTYPE), ndim=2, device=device)
        check_shape("x_scales", x_scales, (x.shape[0], x.shape[1] // BLOCK))
    else:
        if x_scales is not None:
            raise InvalidArgument("x_scales is only for fp8 x", reason="option")
        if x.shape[1] % 8:
            raise InvalidArgument(f"x needs hidden divisible by 8, got {x.shape[1]}", reason="hidden")
    check_routing(cfg, x.shape[0], topk_idx, topk_weights, device)
    if layout not in LAYOUTS:
        raise InvalidArgument(f"layout must be one of {LAYOUTS}, got {layout!r}", reason="option")
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1:
        raise InvalidArgument(f"alignment must be a positive int, got {alignment!r}", reason="option")
    if layout == "flat" and alignment != 1:
        raise InvalidArgument("alignment applies to the expert_major layout only", reason="option")


def validate_ht_combine(
    cfg: GroupConfig,
    device: torch.device,
    x: torch.Tensor,
    rows: int,
    topk_weights: torch.Tensor | None,
    topk: int,
) -> None:
    check_tensor("x", x, dtypes=(torch.bfloat16,), ndim=2, device=device)
    if x.shape[1] % HT_HIDDEN_MULTIPLE:
        raise InvalidArgument(
            f"HT combine needs hidden divisible by {HT_HIDDEN_MULTIPLE}, got {x.shape[1]}", reason="hidden"
        )
    if x.shape[0] != rows:
        raise InvalidArgument(f"x must have the dispatch's {rows} rows, got {x.shape[0]}", reason="shape")
    if x.shape[1] > cfg.hidden:
        raise InvalidArgument(
            f"x has hidden size {x.shape[1]}, more than the group's hidden ({cfg.hidden})", reason="hidden"
        )
    if topk_weights is not None:
        check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), ndim=2, device=device)
        check_shape("topk_weights", topk_weights, (rows, topk))


def check_flags(**flags: object) -> None:
    """Each of ``flags`` is a bool."""
    for name, value in flags.items():
        if value is not True and value is not False:
            raise InvalidArgument(f"{name} must be a bool, got {value!r}", reason="type")


def _check_handle_group(kind: str, handle: LLHandle | HTHandle, group_id: int | None) -> None:
    if group_id is not None and handle.group is not None and handle.group != group_id:
        raise InvalidArgument(
            f"the {kind} handle comes from group {handle.group}, not from this group ({group_id})",
            reason="handle",
        )


def _check_handle_tensor(
    kind: str,
    name: str,
    t: object,
    dtypes: Sequence[torch.dtype],
    shape: Sequence[int | None],
    device: torch.device,
) -> torch.Tensor:
    """A handle field: a tensor of ``dtypes`` on ``device`` whose shape matches ``shape`` (None: any)."""
    field = f"{kind} handle's {name}"
    try:
        check_tensor(field, t, dtypes=dtypes, ndim=len(shape), device=device)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{exc} (is it a handle of this group's dispatch?)", reason="handle") from None
    assert isinstance(t, torch.Tensor)
    if any(want is not None and got != want for got, want in zip(t.shape, shape, strict=True)):
        wanted = tuple("*" if w is None else w for w in shape)
        raise InvalidArgument(
            f"{field} has shape {tuple(t.shape)}; this group's handles have {wanted} "
            "(is it a handle of another group?)",
            reason="handle",
        )
    return t


def validate_ll_handle(
    cfg: GroupConfig, device: torch.device, handle: object, group_id: int | None = None
) -> LLHandle:
    """The handle of an LL combine: an LLHandle of this group's sizes (shapes only, no device sync)."""
    if not isinstance(handle, LLHandle):
        raise InvalidArgument(
            f"handle must be the LLHandle of this group's ll_dispatch, got {type(handle).__name__}",
            reason="handle",
        )
    _check_handle_group("LL", handle, group_id)
    ranks, slots, kmax = cfg.world_size, cfg.max_tokens_per_rank, cfg.max_topk
    send = _check_handle_tensor("LL", "send_slots", handle.send_slots, (torch.int32,), (None, ranks), device)
    if send.shape[0] > slots:
        raise InvalidArgument(
            f"LL handle's send_slots has {send.shape[0]} tokens, more than the group's "
            f"max_tokens_per_rank ({slots}) (is it a handle of another group?)",
            reason="handle",
        )
    _check_handle_tensor("LL", "recv_rows", handle.recv_rows, (torch.int32,), (ranks, slots, kmax), device)
    _check_handle_tensor(
        "LL", "recv_weights", handle.recv_weights, (torch.float32,), (ranks, slots, kmax), device
    )
    _check_handle_tensor("LL", "recv_slot_counts", handle.recv_slot_counts, (torch.int32,), (ranks,), device)
    return handle


def validate_ht_handle(
    cfg: GroupConfig,
    device: torch.device,
    handle: object,
    group_id: int | None = None,
    with_topk: bool = True,
) -> HTHandle:
    """The handle of an HT combine or cached dispatch: an HTHandle of this group's sizes
    (``with_topk=False``: the cached dispatch, which does not read ``recv_topk_idx``)."""
    if not isinstance(handle, HTHandle):
        raise InvalidArgument(
            f"handle must be the HTHandle of this group's ht_dispatch, got {type(handle).__name__}",
            reason="handle",
        )
    _check_handle_group("HT", handle, group_id)
    ranks = cfg.world_size
    send = _check_handle_tensor("HT", "send_pos", handle.send_pos, (torch.int32,), (None, ranks), device)
    if send.shape[0] > cfg.max_tokens_per_rank:
        raise InvalidArgument(
            f"HT handle's send_pos has {send.shape[0]} tokens, more than the group's "
            f"max_tokens_per_rank ({cfg.max_tokens_per_rank}) (is it a handle of another group?)",
            reason="handle",
        )
    slot = _check_handle_tensor("HT", "recv_slot", handle.recv_slot, (torch.int32,), (None,), device)
    _check_handle_tensor("HT", "recv_counts", handle.recv_counts, (torch.int32,), (ranks,), device)
    if not with_topk:
        return handle
    idx = _check_handle_tensor(
        "HT", "recv_topk_idx", handle.recv_topk_idx, (torch.int32,), (slot.shape[0], None), device
    )
    if not 1 <= idx.shape[1] <= cfg.max_topk:
        raise InvalidArgument(
            f"HT handle's recv_topk_idx has top-k {idx.shape[1]}; this group takes 1 to {cfg.max_topk} "
            "(is it a handle of another group?)",
            reason="handle",
        )
    return handle


def validate_ht_dispatch_cached(cfg: GroupConfig, device: torch.device, x: object, handle: HTHandle) -> None:
    """The input of the cached (backward) dispatch: one row per token of the handle's dispatch."""
    if not isinstance(x, torch.Tensor):
        raise InvalidArgument(f"x must be a torch.Tensor, got {type(x).__name__}", reason="type")
    check_tensor("x", x, dtypes=(x.dtype,), ndim=max(x.dim(), 1), device=device)
    tokens = handle.send_pos.shape[0]
    if x.shape[0] != tokens:
        raise InvalidArgument(
            f"x has {x.shape[0]} rows but the handle's dispatch had {tokens} tokens", reason="shape"
        )
