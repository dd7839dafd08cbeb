"""Handles: what a dispatch leaves for its combine (and for the backward pass).

Every field is a tensor whose shape follows from the group's sizes and the dispatch inputs, so
handles can cross ``torch.compile`` graphs and CUDA graphs. Both backends fill them identically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class LLHandle:
    """Routing of one LL dispatch.

    * ``send_slots [B, R]`` int32: slot of token b in rank d's receive area from this rank, -1 if
      b did not go to d. Slots are numbered in token order.
    * ``recv_rows [R, T, Kmax]`` int32: for the token in slot j from rank r, the flattened output
      row (``expert * R*T + position``) of its k-th choice when that expert is local, else -1.
    * ``recv_weights [R, T, Kmax]`` float32: its top-k weights (0 where recv_rows is -1).
    * ``recv_slot_counts [R]`` int32: how many slots each rank filled.
    * ``group``: id of the group whose dispatch made it (None for handles rebuilt from
      tensors); a combine on another group refuses it.

    The combine checks the tensors of a handle (dtype, shape, device, layout) unless it is the
    object this group's dispatch returned; one made with ``dataclasses.replace`` or rebuilt from
    its tensors is checked.
    """

    send_slots: torch.Tensor
    recv_rows: torch.Tensor
    recv_weights: torch.Tensor
    recv_slot_counts: torch.Tensor
    group: int | None = field(default=None, compare=False)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.send_slots, self.recv_rows, self.recv_weights, self.recv_slot_counts)


@dataclass(frozen=True)
class HTHandle:
    """Routing of one HT dispatch.

    * ``send_pos [B, R]`` int32: slot of token b among the tokens this rank sent to rank d, -1 if
      none.
    * ``recv_slot [N]`` int32: ``src_rank * T + slot`` of the token each output row holds, -1 on
      padding rows.
    * ``recv_counts [R]`` int32: tokens received from each rank.
    * ``recv_topk_idx [N, K]`` int64 or int32 (the dtype of the dispatch's ``topk_idx``): local
      expert ids of each row (-1 where the expert is elsewhere).
    * ``group``: id of the group whose dispatch made it (None for handles rebuilt from
      tensors); a combine on another group refuses it.

    The combine and the cached dispatch check its tensors as :class:`LLHandle` says.
    """

    send_pos: torch.Tensor
    recv_slot: torch.Tensor
    recv_counts: torch.Tensor
    recv_topk_idx: torch.Tensor
    group: int | None = field(default=None, compare=False)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.send_pos, self.recv_slot, self.recv_counts, self.recv_topk_idx)


def claim(handle: LLHandle | HTHandle, group: int) -> None:
    """Marks a handle that a dispatch of ``group`` has just made, and that nobody else holds yet, as
    that group's. In place: a copy of the frozen dataclass would cost every eager dispatch about a
    microsecond more."""
    object.__setattr__(handle, "group", group)
    object.__setattr__(handle, _MADE_BY, group)


_MADE_BY = "_made_by"  # not a dataclass field: dataclasses.replace() does not carry it


def made_by(handle: object, group: int) -> bool:
    """Whether ``handle`` is the object a dispatch of ``group`` returned (or a copy of that object):
    its tensors are then that dispatch's outputs, of the group's sizes, and a combine need not check
    them again. A handle made with ``dataclasses.replace`` or from tensors is not."""
    attrs = getattr(handle, "__dict__", None)
    return attrs is not None and attrs.get(_MADE_BY) == group


class LLDispatchOutput(NamedTuple):
    x: torch.Tensor
    """[L, R*T, H] bf16 or fp8 e4m3, expert-major; rows past expert_counts[e] are padding."""
    scales: torch.Tensor | None
    """[L, R*T, H/128] fp32 or float8_e8m0fnu; None for bf16."""
    expert_counts: torch.Tensor
    """[L] int32, on the device."""
    handle: LLHandle


class HTDispatchOutput(NamedTuple):
    x: torch.Tensor
    """[N, H] bf16 or fp8; N is the worst case unless exact shapes were asked for."""
    scales: torch.Tensor | None
    topk_idx: torch.Tensor
    """[N, K] local expert ids in the dtype of the dispatch's topk_idx, -1 where the choice is on
    another rank."""
    topk_weights: torch.Tensor | None
    num_recv: torch.Tensor
    """[1] int32: rows in use (flat: tokens received; expert_major: padded segments)."""
    expert_counts: torch.Tensor
    """[L] int32: rows of each local expert, before alignment padding."""
    handle: HTHandle
