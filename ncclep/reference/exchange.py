"""Variable-size all-to-all of byte rows over torch.distributed, and row packing.

A message is one row of bytes; rows of several tensors are packed side by side so that one
collective moves payload and metadata together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..errors import CommError


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """[n, ...] -> [n, nbytes] uint8 view of each row."""
    flat = t.reshape(t.shape[0], math.prod(t.shape[1:]))
    if flat.stride(-1) != 1:  # a size-1 or empty last dim may carry any stride; view() needs 1
        flat = flat.clone(memory_format=torch.contiguous_format)
    return flat.contiguous().view(torch.uint8)


def pack_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([as_bytes(p) for p in parts], dim=1)


def unpack_rows(
    rows: torch.Tensor, specs: Sequence[tuple[torch.dtype, tuple[int, ...]]]
) -> list[torch.Tensor]:
    """Inverse of pack_rows: specs give each part's dtype and per-row shape."""
    out = []
    offset = 0
    for dtype, shape in specs:
        count = 1
        for s in shape:
            count *= s
        width = count * torch.empty((), dtype=dtype).element_size()
        # a copy, not .contiguous(): a one-row slice is already contiguous but may start at an
        # offset that is not a multiple of dtype's size (e.g. after 1-byte UE8M0 scales)
        part = rows[:, offset : offset + width].clone(memory_format=torch.contiguous_format).view(dtype)
        out.append(part.reshape(rows.shape[0], *shape))
        offset += width
    return out


class Counts(NamedTuple):
    """Row counts per peer, on the host (for the all-to-all's splits) and on the device."""

    host: list[int]
    device: torch.Tensor


def exchange_counts(
    send_counts: torch.Tensor,
    group: dist.ProcessGroup | None,
    *,
    phase: str,
    problem: Exception | None = None,
) -> Counts:
    """Row counts per peer, each with a status word so one rank's bad input fails every rank.

    A rank whose input was rejected still takes part (sending zero rows) and then raises
    ``problem``; its peers raise CommError naming it, instead of waiting for rows that never come.
    One host sync.
    """
    status = torch.full_like(send_counts, 0 if problem is None else 1)
    send = torch.stack([send_counts, status], dim=1)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    if problem is not None:
        raise problem
    pairs = recv.tolist()
    peers = [p[1] for p in pairs]
    if any(peers):
        peer = peers.index(1)
        rank = dist.get_rank(group)
        raise CommError(
            f"{phase}: rank {peer} rejected its input, so no rows were exchanged",
            phase=phase,
            rank=rank,
            peer=peer,
        )
    return Counts([p[0] for p in pairs], recv[:, 0])


@dataclass
class PendingRows:
    """An all-to-all in flight; ``wait()`` returns the received rows."""

    recv: torch.Tensor
    work: dist.Work | None

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.recv


def exchange_rows(
    send: torch.Tensor,
    send_counts: list[int],
    recv_counts: list[int],
    group: dist.ProcessGroup | None,
) -> PendingRows:
    """Rows ``send`` (grouped by destination, ``send_counts`` each) to every rank; async."""
    width = send.shape[1]
    recv = torch.empty((sum(recv_counts), width), dtype=send.dtype, device=send.device)
    work = dist.all_to_all_single(
        recv.view(-1),
        send.reshape(-1),
        [c * width for c in recv_counts],
        [c * width for c in send_counts],
        group=group,
        async_op=True,
    )
    return PendingRows(recv, work)
