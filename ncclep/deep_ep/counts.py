"""The one host synchronisation of an exact-size HT dispatch: every rank's counts, gathered.

DeepEP's HT dispatch returns exactly the rows a rank receives, and the received tokens per local
expert as a Python list; to size them it exchanges the layout counts between ranks and waits on
the host for the result (unless ``num_worst_tokens`` is given). The shim does the same before
ncclep's dispatch: one ``all_gather`` of ``[tokens per rank (R), tokens per expert (E), tokens]``
from every rank, read on the host once. From it follow the rows to return, the per-expert list,
the most tokens any rank passes (which sizes the HT group, the same on every rank) and DeepEP's
``rank_prefix_matrix``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import InvalidArgument

_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class ExactSizes:
    device_counts: torch.Tensor
    """[R, R+E+1] int32 on the device: each rank's tokens per rank, per expert, and token count."""
    max_tokens: int
    """The most tokens any rank passes to this dispatch."""
    num_recv: int
    """Tokens this rank receives."""
    per_expert: list[int]
    """Tokens each local expert receives, rounded up to the alignment."""


def gather_exact_sizes(
    process_group: Any,
    tokens: int,
    num_tokens_per_rank: torch.Tensor,
    num_tokens_per_expert: torch.Tensor,
    expert_alignment: int,
) -> ExactSizes:
    """Gather every rank's layout counts (a collective) and read them on the host (one sync)."""
    rank = dist.get_rank(process_group)
    world = dist.get_world_size(process_group)
    experts = num_tokens_per_expert.numel()
    if tuple(num_tokens_per_rank.shape) != (world,):
        raise InvalidArgument(f"num_tokens_per_rank must be [{world}], got {list(num_tokens_per_rank.shape)}")
    if num_tokens_per_expert.dim() != 1 or experts % world:
        raise InvalidArgument(
            f"num_tokens_per_expert must be [num_experts] with num_experts divisible by {world}, "
            f"got {list(num_tokens_per_expert.shape)}"
        )
    device = num_tokens_per_rank.device
    mine = torch.cat(
        [
            num_tokens_per_rank.to(torch.int32),
            num_tokens_per_expert.to(device=device, dtype=torch.int32),
            torch.full((1,), tokens, dtype=torch.int32, device=device),
        ]
    )
    gathered = torch.empty(world * mine.numel(), dtype=torch.int32, device=device)
    _gather(gathered, mine, group=process_group)
    gathered = gathered.view(world, mine.numel())
    host = gathered.cpu()  # the host synchronisation
    local = experts // world
    first = world + rank * local
    # the columns this rank needs, read into Python once: tokens sent to it, its experts', tokens
    columns = [rank, *range(first, first + local), world + experts]
    needed = host[:, columns].tolist()
    per_expert = [sum(column) for column in zip(*(row[1:-1] for row in needed), strict=True)]
    if expert_alignment > 1:
        per_expert = [-(-n // expert_alignment) * expert_alignment for n in per_expert]
    return ExactSizes(
        device_counts=gathered,
        max_tokens=max(row[-1] for row in needed),
        num_recv=sum(row[0] for row in needed),
        per_expert=per_expert,
    )
