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
from typing import Any

import torch

from ..errors import InvalidArgument
from ..group import Group
from ..handles import HTHandle, LLHandle


class LowLatencyHandle:
    """What ``low_latency_dispatch`` leaves for ``low_latency_combine``.

    Arguments:
        plan: the dispatch's :class:`~ncclep.deep_ep.low_latency.LLPlan` (its group and sizes).
        num_tokens: the tokens the dispatch sent.
        routing: ncclep's routing; None until the dispatch's receive hook has run.
        weights: the weights the dispatch carried, when the caller gave them.
    """

    __slots__ = ("_layout", "_weights", "_weights_version", "num_tokens", "plan", "routing")

    def __init__(
        self, plan: Any, num_tokens: int, routing: LLHandle | None, weights: torch.Tensor | None
    ) -> None:
        self.plan = plan
        self.num_tokens = num_tokens
        self.routing = routing
        self._weights = weights
        self._weights_version = 0 if weights is None else weights._version
        self._layout: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def group(self) -> Group:
        return self.plan.group

    @property
    def num_max_dispatch_tokens_per_rank(self) -> int:
        return self.plan.num_max_dispatch_tokens_per_rank

    @property
    def hidden(self) -> int:
        return self.plan.hidden

    @property
    def num_experts(self) -> int:
        return self.plan.num_experts

    @property
    def num_topk(self) -> int:
        return self.plan.topk

    @property
    def dispatch_weights(self) -> tuple[torch.Tensor, int] | None:
        """The weights the dispatch carried (tensor, its version), when the caller gave them."""
        return None if self._weights is None else (self._weights, self._weights_version)

    def received(self) -> LLHandle:
        if self.routing is None:
            raise InvalidArgument("the dispatch of this handle has not received yet: call its hook first")
        return self.routing

    def carries(self, topk_weights: torch.Tensor) -> bool:
        """Whether the dispatch carried exactly these weights (same tensor, not modified since)."""
        return self._weights is topk_weights and topk_weights._version == self._weights_version

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

    def __repr__(self) -> str:
        return (
            f"LowLatencyHandle(tokens={self.num_tokens}, T={self.num_max_dispatch_tokens_per_rank}, "
            f"hidden={self.hidden}, experts={self.num_experts}, received={self.routing is not None})"
        )


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


class DispatchHandle:
    """What an HT ``dispatch`` leaves for ``combine`` and for a cached ``dispatch``.

    Arguments:
        group: the HT group of the dispatch.
        routing: ncclep's routing.
        num_rows: rows the dispatch returned: the tokens received, or ``num_worst_tokens``.
        is_token_in_rank: the dispatch's argument (``handle[4]``).
        counts: ``[R, R+E+1]`` int32 on the device: each rank's tokens per rank, per expert and
            token count, as the exact-size dispatch gathered them; None after a
            ``num_worst_tokens`` dispatch.
    """

    __slots__ = ("counts", "group", "is_token_in_rank", "num_rows", "routing")

    def __init__(
        self,
        group: Group,
        routing: HTHandle,
        num_rows: int,
        is_token_in_rank: torch.Tensor,
        counts: torch.Tensor | None = None,
    ) -> None:
        self.group = group
        self.routing = routing
        self.num_rows = num_rows
        self.is_token_in_rank = is_token_in_rank
        self.counts = counts

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
