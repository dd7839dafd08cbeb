"""``get_dispatch_layout``'s arithmetic: where each token goes, counted per rank, node and expert.

Device ops only (no host synchronisation), any top-k, ``-1`` for no choice. An id outside
``[0, num_experts)`` is no choice too, and a token that names an expert twice counts once for it
(ncclep's kernels drop repeated choices the same way).

On CUDA with the extension: one call of ``ncclep._C.dispatch_layout`` (a memset and one kernel);
elsewhere (the CPU, a pure-Python install, int dtypes other than int32/int64, sizes past the
kernel's limits): :func:`torch_dispatch_layout`, which is also the tests' reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .. import _native


class DispatchLayout(NamedTuple):
    num_tokens_per_rank: torch.Tensor
    """[R] int32: tokens with at least one expert on each rank."""
    num_tokens_per_rdma_rank: torch.Tensor | None
    """[nodes] int32: tokens with at least one expert on each node; None on one node."""
    num_tokens_per_expert: torch.Tensor
    """[E] int32: tokens that chose each expert."""
    is_token_in_rank: torch.Tensor
    """[B, R] bool: whether each token goes to each rank."""


_native_layout: Callable[..., Any] | None = getattr(_native._C, "dispatch_layout", None)
_NATIVE_MAX_RANKS = int(getattr(_native._C, "DISPATCH_LAYOUT_MAX_RANKS", 0))
_NATIVE_MAX_EXPERTS = int(getattr(_native._C, "DISPATCH_LAYOUT_MAX_EXPERTS", 0))
_NATIVE_DTYPES = (torch.int64, torch.int32)


def dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, world_size: int, num_nodes: int
) -> DispatchLayout:
    """The layout of ``topk_idx [B, K]`` (expert ids, -1 for none) over ``world_size`` ranks that
    hold ``num_experts / world_size`` experts each, ``num_nodes`` consecutive blocks of ranks.

    The three counts of the native op are views of one int32 tensor.
    """
    if (
        _native_layout is not None
        and topk_idx.is_cuda
        and topk_idx.dtype in _NATIVE_DTYPES
        and world_size <= _NATIVE_MAX_RANKS
        and num_experts <= _NATIVE_MAX_EXPERTS
    ):
        return DispatchLayout(*_native_layout(topk_idx, num_experts, world_size, num_nodes))
    return torch_dispatch_layout(topk_idx, num_experts, world_size, num_nodes)


def torch_dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, world_size: int, num_nodes: int
) -> DispatchLayout:
    """:func:`dispatch_layout` in torch ops, on any device.

    One ``[B, E+1]`` table of which experts each token chose (column E takes the ids that are no
    choice) gives all the counts: seven device ops for int64 ids (one more widens other ints), two
    more for the per-node counts.
    """
    tokens = topk_idx.shape[0]
    chosen = torch.zeros((tokens, num_experts + 1), dtype=torch.bool, device=topk_idx.device)
    # clamp: ids past the experts become E, those below -1 become -1; then -1 mod (E + 1) = E
    columns = topk_idx.long().clamp(-1, num_experts).remainder(num_experts + 1)
    chosen.scatter_(1, columns, True)
    per_expert = chosen.sum(dim=0, dtype=torch.int32)
    is_token_in_rank = chosen[:, :num_experts].view(tokens, world_size, num_experts // world_size).any(dim=2)
    per_rdma = None
    if num_nodes > 1:
        per_node = is_token_in_rank.view(tokens, num_nodes, world_size // num_nodes).any(dim=2)
        per_rdma = per_node.sum(dim=0, dtype=torch.int32)
    return DispatchLayout(
        num_tokens_per_rank=is_token_in_rank.sum(dim=0, dtype=torch.int32),
        num_tokens_per_rdma_rank=per_rdma,
        num_tokens_per_expert=per_expert[:num_experts],
        is_token_in_rank=is_token_in_rank,
    )
