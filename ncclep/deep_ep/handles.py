"""The handles Buffer dispatches return, to be passed to the matching combine (or cached dispatch).

Both keep the ncclep group and routing of their dispatch. Frameworks treat DeepEP's handles as
opaque; DeepEP's own tests read a few of their elements, which these give by index:

* :class:`LowLatencyHandle`: DeepEP's ``(src_info, layout_range, num_max_dispatch_tokens_per_rank,
  hidden, num_experts)``. ``layout_range`` is DeepEP's exactly; ``src_info`` names each row's
  *slot among the tokens its source rank sent to this rank* (DeepEP: the source token's index),
  which ncclep's routing has and the source token index it does not. Both are computed on first
  access (device ops, no host synchronisation).
* :class:`DispatchHandle` (HT): element 0 is DeepEP's ``rank_prefix_matrix`` and element 4
  ``is_token_in_rank``; the others (DeepEP's channel matrices, source indices and send heads)
  have no ncclep counterpart and raise :class:`ncclep.InvalidArgument`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidArgument
from ..group import Group
from ..handles import HTHandle, LLHandle


@dataclass(eq=False)
class LowLatencyHandle:
    """What ``low_latency_dispatch`` leaves for ``low_latency_combine``."""

    group: Group
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    num_tokens: int
    num_topk: int
    routing: LLHandle | None = None
    """ncclep's routing; None until the dispatch's receive hook has run."""
    dispatch_weights: tuple[torch.Tensor, int] | None = None
    """The weights the dispatch carried (tensor, its version), when the caller gave them."""
    _layout: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def received(self) -> LLHandle:
        if self.routing is None:
            raise InvalidArgument("the dispatch of this handle has not received yet: call its hook first")
        return self.routing

    def carries(self, topk_weights: torch.Tensor) -> bool:
        """Whether the dispatch carried exactly these weights (same tensor, not modified since)."""
        if self.dispatch_weights is None:
            return False
        tensor, version = self.dispatch_weights
        return tensor is topk_weights and tensor._version == version

    def _src_info_and_layout_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._layout is None:
            self._layout = src_info_and_layout_range(self.received(), self.group.num_local_experts)
        return self._layout

    def __getitem__(self, index: int) -> Any:
        items = (
            lambda: self._src_info_and_layout_range()[0],
            lambda: self._src_info_and_layout_range()[1],
            lambda: self.num_max_dispatch_tokens_per_rank,
            lambda: self.hidden,
            lambda: self.num_experts,
        )
        return items[index]()

    def __len__(self) -> int:
        return 5

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(5))


def src_info_and_layout_range(routing: LLHandle, num_local_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(src_info [L, R*T] int32, layout_range [L, R] int64)`` of an LL dispatch's routing.

    ``layout_range[e, r] = begin << 32 | count``: rows ``[begin, begin+count)`` of expert e came
    from rank r. ``src_info[e, row]``: the row's slot on its source rank; -1 past the rows in use.
    """
    ranks, slots, max_topk = routing.recv_rows.shape
    rows_per_expert = ranks * slots
    total = num_local_experts * rows_per_expert
    device = routing.recv_rows.device
    rows = routing.recv_rows.long()
    valid = rows >= 0
    slot = torch.arange(slots, device=device).view(1, slots, 1).expand(ranks, slots, max_topk)
    src_info = torch.full((total + 1,), -1, dtype=torch.int32, device=device)
    src_info[torch.where(valid, rows, total)] = slot.to(torch.int32)
    source = torch.arange(ranks, device=device).view(ranks, 1, 1).expand_as(rows)
    bucket = torch.where(valid, (rows // rows_per_expert) * ranks + source, num_local_experts * ranks)
    counts = torch.zeros(num_local_experts * ranks + 1, dtype=torch.int64, device=device)
    counts.index_add_(0, bucket.reshape(-1), torch.ones(bucket.numel(), dtype=torch.int64, device=device))
    counts = counts[:-1].view(num_local_experts, ranks)
    begin = torch.cumsum(counts, dim=1) - counts
    src_info = src_info[:total].view(num_local_experts, rows_per_expert)
    return src_info, (begin << 32) | counts


@dataclass(eq=False)
class DispatchHandle:
    """What an HT ``dispatch`` leaves for ``combine`` and for a cached ``dispatch``."""

    group: Group
    routing: HTHandle
    num_rows: int
    """Rows the dispatch returned: the tokens received, or ``num_worst_tokens``."""
    is_token_in_rank: torch.Tensor
    counts: torch.Tensor | None = None
    """[R, R+E+1] int32 on the device: each rank's tokens per rank, per expert and token count, as
    the exact-size dispatch gathered them; None after a ``num_worst_tokens`` dispatch."""

    @property
    def rank_prefix_matrix(self) -> torch.Tensor:
        """``[R, R]`` int32: ``[i, j]`` tokens ranks ``0..i`` send to rank j (DeepEP's matrix)."""
        if self.counts is None:
            raise InvalidArgument(
                "rank_prefix_matrix is only known after an exact-size dispatch (num_worst_tokens=0)"
            )
        ranks = self.counts.shape[0]
        return torch.cumsum(self.counts[:, :ranks], dim=0, dtype=torch.int32)

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == 0:
            return self.rank_prefix_matrix
        if index == 4:
            return self.is_token_in_rank
        raise InvalidArgument(
            f"element {index} of DeepEP's HT handle (channel matrices, source indices, send heads) has no "
            "ncclep counterpart; handle[0] is rank_prefix_matrix and handle[4] is_token_in_rank"
        )
