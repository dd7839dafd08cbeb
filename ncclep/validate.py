"""Input checks run before anything is launched. Each failure names the argument and the limit.

A group's checks are a :class:`Checks`, made with the group, which works out once what depends only
on the group's sizes and device. They run on every eager call, where a microsecond of host time
counts: each check reads a tensor's attributes once, and messages are only built for a failure.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import HT_HIDDEN_MULTIPLE, LAYOUTS, GroupConfig
from .errors import InvalidArgument
from .fp8 import BLOCK, FP8_DTYPE, UE8M0_DTYPE, UE8M0_PER_WORD
from .handles import HTHandle, LLHandle, made_by

Dtypes = tuple[torch.dtype, ...]
Pattern = tuple[int | None, ...]  # a shape; None stands for any size

INDEX_DTYPES: Dtypes = (torch.int64, torch.int32)
BF16: Dtypes = (torch.bfloat16,)
FP32: Dtypes = (torch.float32,)
INT32: Dtypes = (torch.int32,)
HT_X_DTYPES: Dtypes = (torch.bfloat16, FP8_DTYPE)
SCALE_DTYPES: Dtypes = (torch.float32, UE8M0_DTYPE)


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def device_index(device: torch.device) -> int:
    """``Tensor.get_device()`` of a tensor on ``device`` (cheaper than ``Tensor.device``)."""
    return -1 if device.type == "cpu" else (device.index if device.index is not None else -2)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_flag(name: str, value: object) -> None:
    if value is not True and value is not False:
        raise InvalidArgument(f"{name} must be a bool, got {value!r}", reason="type")


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


def _check_shape(name: str, shape: torch.Size, expected: tuple[int, ...]) -> None:
    if shape != expected:  # torch.Size compares as a tuple
        raise InvalidArgument(f"{name} must have shape {tuple(expected)}, got {tuple(shape)}", reason="shape")


def _check_handle_group(kind: str, handle: LLHandle | HTHandle, group_id: int | None) -> None:
    if group_id is not None and handle.group is not None and handle.group != group_id:
        raise InvalidArgument(
            f"the {kind} handle comes from group {handle.group}, not from this group ({group_id})",
            reason="handle",
        )


# a handle's fields as the messages name them
SEND_SLOTS = "LL handle's send_slots"
RECV_ROWS = "LL handle's recv_rows"
RECV_WEIGHTS = "LL handle's recv_weights"
RECV_SLOT_COUNTS = "LL handle's recv_slot_counts"
SEND_POS = "HT handle's send_pos"
RECV_SLOT = "HT handle's recv_slot"
RECV_COUNTS = "HT handle's recv_counts"
RECV_TOPK_IDX = "HT handle's recv_topk_idx"


def _problem(message: str, reason: str, of_handle: bool) -> InvalidArgument:
    """A tensor check's failure; a handle's field fails with reason "handle" and a hint."""
    if of_handle:
        return InvalidArgument(f"{message} (is it a handle of this group's dispatch?)", reason="handle")
    return InvalidArgument(message, reason=reason)


def _wrong_handle_shape(field: str, shape: torch.Size, pattern: Pattern) -> InvalidArgument:
    wanted = tuple("*" if w is None else w for w in pattern)
    return InvalidArgument(
        f"{field} has shape {tuple(shape)}; this group's handles have {wanted} "
        "(is it a handle of another group?)",
        reason="handle",
    )


class Checks:
    """The argument checks of one group's ops. Each raises :class:`InvalidArgument` naming the
    first thing wrong, in the order the checks are written here."""

    def __init__(self, cfg: GroupConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.device_index = device_index(device)
        ranks = cfg.world_size
        self.per_rank = (ranks,)  # shape of recv_slot_counts and recv_counts
        self.per_slot = (ranks, cfg.max_tokens_per_rank, cfg.max_topk)  # of recv_rows and recv_weights

    def _mode(self, mode: str) -> None:
        if self.cfg.mode != mode:
            raise InvalidArgument(f"{mode.upper()} ops need a group made with mode={mode!r}", reason="mode")

    def tensor(self, name: str, t: object, dtypes: Dtypes, ndim: int, of_handle: bool = False) -> torch.Size:
        """``t`` is a contiguous tensor of one of ``dtypes`` with ``ndim`` dimensions on the
        group's device. Returns its shape. ``of_handle``: ``t`` is a handle's field."""
        if not isinstance(t, torch.Tensor):
            raise _problem(f"{name} must be a torch.Tensor, got {type(t).__name__}", "type", of_handle)
        if t.dtype not in dtypes:
            raise _problem(f"{name} must have dtype {_names(dtypes)}, got {t.dtype}", "dtype", of_handle)
        shape = t.shape
        if len(shape) != ndim:
            raise _problem(f"{name} must be {ndim}-D, got shape {tuple(shape)}", "shape", of_handle)
        if t.get_device() != self.device_index and not _same_device(t.device, self.device):
            raise _problem(f"{name} must be on {self.device}, got {t.device}", "device", of_handle)
        if not t.is_contiguous():
            raise _problem(f"{name} must be contiguous", "layout", of_handle)
        return shape

    # ----------------------------------------------------------------------------- inputs

    def _tokens(self, shape: torch.Size) -> tuple[int, int]:
        """(tokens, hidden) of ``x``'s ``shape``, within the group's sizes."""
        cfg = self.cfg
        tokens, hidden = shape
        if tokens > cfg.max_tokens_per_rank:
            raise InvalidArgument(
                f"x has {tokens} tokens, more than the group's max_tokens_per_rank "
                f"({cfg.max_tokens_per_rank})",
                reason="tokens",
            )
        if hidden > cfg.hidden:
            raise InvalidArgument(
                f"x has hidden size {hidden}, more than the group's hidden ({cfg.hidden})", reason="hidden"
            )
        return tokens, hidden

    def _routing(self, tokens: int, topk_idx: object, topk_weights: object) -> None:
        shape = self.tensor("topk_idx", topk_idx, INDEX_DTYPES, 2)
        if shape[0] != tokens:
            raise InvalidArgument(f"topk_idx has {shape[0]} rows but x has {tokens} tokens", reason="shape")
        topk = shape[1]
        if not 1 <= topk <= self.cfg.max_topk:
            raise InvalidArgument(
                f"top-k is {topk}; it must be between 1 and max_topk ({self.cfg.max_topk})", reason="topk"
            )
        if topk_weights is not None:
            _check_shape("topk_weights", self.tensor("topk_weights", topk_weights, FP32, 2), shape)

    # ----------------------------------------------------------------------------- ops

    def ll_dispatch(
        self,
        x: object,
        topk_idx: object,
        topk_weights: object,
        use_fp8: object,
        ue8m0: object,
        send_only: object,
        column_major_scales: object = False,
        round_scale: object = False,
    ) -> None:
        self._mode("ll")
        check_flag("use_fp8", use_fp8)
        check_flag("ue8m0", ue8m0)
        check_flag("send_only", send_only)
        tokens, hidden = self._tokens(self.tensor("x", x, BF16, 2))
        if hidden % BLOCK:
            raise InvalidArgument(
                f"LL dispatch needs hidden divisible by {BLOCK}, got {hidden}", reason="hidden"
            )
        if topk_weights is None:  # optional in HT (_routing lets None through), required here
            raise InvalidArgument(
                "topk_weights must be a torch.Tensor [B, K] float32 for LL dispatch, got None", reason="type"
            )
        self._routing(tokens, topk_idx, topk_weights)
        if ue8m0 and not use_fp8:
            raise InvalidArgument("ue8m0 scales need use_fp8=True", reason="option")
        if round_scale is not False:
            check_flag("round_scale", round_scale)
            if not use_fp8 or ue8m0:
                raise InvalidArgument(
                    "round_scale (fp32 scales rounded to powers of two) needs use_fp8=True and not ue8m0 "
                    "(whose scales are powers of two already)",
                    reason="option",
                )
        if column_major_scales is not False:  # the checks below run only for a call that asks for it
            check_flag("column_major_scales", column_major_scales)
            if not use_fp8:
                raise InvalidArgument("column_major_scales needs use_fp8=True", reason="option")
            if ue8m0 and hidden % (BLOCK * UE8M0_PER_WORD):
                raise InvalidArgument(
                    f"column-major UE8M0 scales are packed four to an int32 word: hidden must be divisible "
                    f"by {BLOCK * UE8M0_PER_WORD}, got {hidden}",
                    reason="hidden",
                )

    def ll_combine(
        self,
        expert_out: object,
        handle: LLHandle,
        out: object,
        send_only: object,
        group_id: int,
        topk_weights: object = None,
    ) -> None:
        self._mode("ll")
        check_flag("send_only", send_only)
        self._ll_handle(handle, group_id)
        cfg = self.cfg
        shape = self.tensor("expert_out", expert_out, BF16, 3)
        experts, rows, hidden = shape
        if experts != cfg.num_local_experts or rows != cfg.ll_rows_per_expert:
            raise InvalidArgument(
                f"expert_out must have shape ({cfg.num_local_experts}, {cfg.ll_rows_per_expert}, hidden), "
                f"got {tuple(shape)}",
                reason="shape",
            )
        if hidden > cfg.hidden or hidden % BLOCK:
            raise InvalidArgument(
                f"expert_out hidden must be a multiple of {BLOCK} up to {cfg.hidden}, got {hidden}",
                reason="hidden",
            )
        if out is not None:
            expected = (handle.send_slots.shape[0], hidden)
            _check_shape("out", self.tensor("out", out, BF16, 2), expected)
        if topk_weights is not None:
            tokens, topk = self.tensor("topk_weights", topk_weights, FP32, 2)
            if tokens != handle.send_slots.shape[0] or not 1 <= topk <= cfg.max_topk:
                raise InvalidArgument(
                    f"topk_weights must be [{handle.send_slots.shape[0]}, K] with 1 <= K <= max_topk "
                    f"({cfg.max_topk}) for this handle, got {[tokens, topk]}",
                    reason="shape",
                )

    def ht_dispatch(
        self,
        x: torch.Tensor,
        x_scales: object,
        topk_idx: object,
        topk_weights: object,
        layout: object,
        alignment: object,
        send_only: object,
    ) -> None:
        self._mode("ht")
        check_flag("send_only", send_only)
        tokens, hidden = self._tokens(self.tensor("x", x, HT_X_DTYPES, 2))
        if x.dtype == FP8_DTYPE:
            if hidden % BLOCK:
                raise InvalidArgument(
                    f"fp8 x needs hidden divisible by {BLOCK}, got {hidden}", reason="hidden"
                )
            if x_scales is None:
                raise InvalidArgument("fp8 x needs x_scales [B, H/128]", reason="type")
            scales = self.tensor("x_scales", x_scales, SCALE_DTYPES, 2)
            _check_shape("x_scales", scales, (tokens, hidden // BLOCK))
        else:
            if x_scales is not None:
                raise InvalidArgument("x_scales is only for fp8 x", reason="option")
            if hidden % 8:
                raise InvalidArgument(f"x needs hidden divisible by 8, got {hidden}", reason="hidden")
        self._routing(tokens, topk_idx, topk_weights)
        if layout not in LAYOUTS:
            raise InvalidArgument(f"layout must be one of {LAYOUTS}, got {layout!r}", reason="option")
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1:
            raise InvalidArgument(f"alignment must be a positive int, got {alignment!r}", reason="option")
        if layout == "flat" and alignment != 1:
            raise InvalidArgument("alignment applies to the expert_major layout only", reason="option")

    def ht_combine(
        self, x: object, handle: HTHandle, topk_weights: object, send_only: object, group_id: int
    ) -> None:
        self._mode("ht")
        check_flag("send_only", send_only)
        rows, topk = self._ht_handle(handle, group_id)
        cfg = self.cfg
        got_rows, hidden = self.tensor("x", x, BF16, 2)
        if hidden % HT_HIDDEN_MULTIPLE:
            raise InvalidArgument(
                f"HT combine needs hidden divisible by {HT_HIDDEN_MULTIPLE}, got {hidden}", reason="hidden"
            )
        if got_rows > rows:
            raise InvalidArgument(
                f"x must have at most the dispatch's {rows} rows, got {got_rows}", reason="shape"
            )
        if hidden > cfg.hidden:
            raise InvalidArgument(
                f"x has hidden size {hidden}, more than the group's hidden ({cfg.hidden})", reason="hidden"
            )
        if topk_weights is not None:
            shape = self.tensor("topk_weights", topk_weights, FP32, 2)
            _check_shape("topk_weights", shape, (got_rows, topk))

    def ht_dispatch_cached(self, x: object, handle: HTHandle, group_id: int | None = None) -> None:
        """The cached (backward) dispatch: ``handle`` an HTHandle of this group's sizes (any group's:
        the op has no group to compare; ``group_id``, when given, only spares the checks of a handle
        that group's dispatch made), ``x`` one row per token of the handle's dispatch."""
        if group_id is None or not made_by(handle, group_id):
            self._ht_handle_routing(handle, None)
        if not isinstance(x, torch.Tensor):
            raise InvalidArgument(f"x must be a torch.Tensor, got {type(x).__name__}", reason="type")
        shape = self.tensor("x", x, (x.dtype,), max(x.dim(), 1))
        tokens = handle.send_pos.shape[0]
        if shape[0] != tokens:
            raise InvalidArgument(
                f"x has {shape[0]} rows but the handle's dispatch had {tokens} tokens", reason="shape"
            )

    # ----------------------------------------------------------------------------- handles

    def _handle_tensor_of_shape(self, field: str, t: object, dtypes: Dtypes, shape: tuple[int, ...]) -> None:
        got = self.tensor(field, t, dtypes, len(shape), of_handle=True)
        if got != shape:
            raise _wrong_handle_shape(field, got, shape)

    def _ll_handle(self, handle: object, group_id: int) -> None:
        """The handle of an LL combine: an LLHandle of this group's sizes (shapes only, no device sync)."""
        if not isinstance(handle, LLHandle):
            raise InvalidArgument(
                f"handle must be the LLHandle of this group's ll_dispatch, got {type(handle).__name__}",
                reason="handle",
            )
        if made_by(handle, group_id):
            return
        _check_handle_group("LL", handle, group_id)
        ranks, slots = self.cfg.world_size, self.cfg.max_tokens_per_rank
        send = self.tensor(SEND_SLOTS, handle.send_slots, INT32, 2, of_handle=True)
        if send[1] != ranks:
            raise _wrong_handle_shape(SEND_SLOTS, send, (None, ranks))
        if send[0] > slots:
            raise InvalidArgument(
                f"LL handle's send_slots has {send[0]} tokens, more than the group's "
                f"max_tokens_per_rank ({slots}) (is it a handle of another group?)",
                reason="handle",
            )
        self._handle_tensor_of_shape(RECV_ROWS, handle.recv_rows, INT32, self.per_slot)
        self._handle_tensor_of_shape(RECV_WEIGHTS, handle.recv_weights, FP32, self.per_slot)
        self._handle_tensor_of_shape(RECV_SLOT_COUNTS, handle.recv_slot_counts, INT32, self.per_rank)

    def _ht_handle(self, handle: HTHandle, group_id: int) -> tuple[int, int]:
        """The handle of an HT combine: an HTHandle of this group's sizes. Returns (rows, top-k) of
        its dispatch's output."""
        if made_by(handle, group_id):
            return handle.recv_slot.shape[0], handle.recv_topk_idx.shape[1]
        rows = self._ht_handle_routing(handle, group_id)
        idx = self.tensor(RECV_TOPK_IDX, handle.recv_topk_idx, INDEX_DTYPES, 2, of_handle=True)
        if idx[0] != rows:
            raise _wrong_handle_shape(RECV_TOPK_IDX, idx, (rows, None))
        if not 1 <= idx[1] <= self.cfg.max_topk:
            raise InvalidArgument(
                f"HT handle's recv_topk_idx has top-k {idx[1]}; this group takes 1 to {self.cfg.max_topk} "
                "(is it a handle of another group?)",
                reason="handle",
            )
        return rows, idx[1]

    def _ht_handle_routing(self, handle: object, group_id: int | None) -> int:
        """An HTHandle of this group's sizes but for ``recv_topk_idx`` (which the cached dispatch
        does not read). Returns the rows of its dispatch's output."""
        if not isinstance(handle, HTHandle):
            raise InvalidArgument(
                f"handle must be the HTHandle of this group's ht_dispatch, got {type(handle).__name__}",
                reason="handle",
            )
        _check_handle_group("HT", handle, group_id)
        cfg = self.cfg
        send = self.tensor(SEND_POS, handle.send_pos, INT32, 2, of_handle=True)
        if send[1] != cfg.world_size:
            raise _wrong_handle_shape(SEND_POS, send, (None, cfg.world_size))
        if send[0] > cfg.max_tokens_per_rank:
            raise InvalidArgument(
                f"HT handle's send_pos has {send[0]} tokens, more than the group's "
                f"max_tokens_per_rank ({cfg.max_tokens_per_rank}) (is it a handle of another group?)",
                reason="handle",
            )
        rows = self.tensor(RECV_SLOT, handle.recv_slot, INT32, 1, of_handle=True)[0]
        self._handle_tensor_of_shape(RECV_COUNTS, handle.recv_counts, INT32, self.per_rank)
        return rows
