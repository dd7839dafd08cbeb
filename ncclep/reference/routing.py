"""Routing arithmetic shared by the reference LL and HT paths."""

from __future__ import annotations

import torch

from ..config import GroupConfig
from ..errors import InvalidArgument
from ..validate import check_expert_ids


def rejected(cfg: GroupConfig, topk_idx: torch.Tensor) -> InvalidArgument | None:
    """The value check of topk_idx, returned rather than raised (peers must hear of it first)."""
    try:
        check_expert_ids(cfg, topk_idx)
    except InvalidArgument as exc:
        return exc
    return None


def destination_mask(topk_idx: torch.Tensor, experts_per_rank: int, world_size: int) -> torch.Tensor:
    """[B, R] bool: token b has at least one expert on rank d."""
    tokens = topk_idx.shape[0]
    idx = topk_idx.long()
    ranks = torch.where(idx >= 0, idx // experts_per_rank, world_size)  # column R collects the -1s
    mask = torch.zeros((tokens, world_size + 1), dtype=torch.bool, device=topk_idx.device)
    mask.scatter_(1, ranks, True)
    return mask[:, :world_size].contiguous()


def slots_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, R] int32: the slot of token b among the tokens going to rank d (token order), else -1."""
    slots = mask.to(torch.int32).cumsum(dim=0, dtype=torch.int32) - 1
    return torch.where(mask, slots, torch.full_like(slots, -1))


def sender_order(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor]:
    """Messages grouped by destination rank, tokens ascending within each.

    Returns (token index of each message, destination of each message, count per destination on
    the host and on the device). One host sync: the counts, which the all-to-all needs anyway.
    """
    counts = mask.sum(dim=0)
    host = counts.tolist()
    pairs = torch.nonzero_static(mask.t(), size=sum(host))
    return pairs[:, 1], pairs[:, 0], host, counts


def local_choices(topk_idx: torch.Tensor, dest: torch.Tensor, experts_per_rank: int) -> torch.Tensor:
    """For messages (rows of topk_idx) sent to ranks ``dest``: local expert ids there, else -1."""
    idx = topk_idx.long()
    on_dest = (idx >= 0) & (idx // experts_per_rank == dest.unsqueeze(1))
    return torch.where(on_dest, idx - dest.unsqueeze(1) * experts_per_rank, -1).to(torch.int32)


def positions_within_expert(
    local_ids: torch.Tensor, num_local_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row of each (message, choice) inside its expert, messages in arrival order.

    local_ids [M, K] int32 with -1 for none. Returns (positions [M, K] int64 with -1 for none,
    counts [L] int64). No host sync: empty choices go to an extra bucket L, sorted last.
    """
    messages, topk = local_ids.shape
    valid = local_ids >= 0
    experts = torch.where(valid, local_ids.long(), num_local_experts)
    counts = torch.bincount(experts.reshape(-1), minlength=num_local_experts + 1)
    # Experts are distinct within a message, so (expert, message) orders the pairs uniquely.
    message_of = torch.arange(messages, device=local_ids.device).unsqueeze(1).expand(messages, topk)
    order = (experts * max(messages, 1) + message_of).reshape(-1).argsort()
    starts = torch.cumsum(counts, 0) - counts
    ranked = torch.arange(messages * topk, device=local_ids.device) - starts[experts.reshape(-1)[order]]
    positions = torch.empty(messages * topk, dtype=torch.int64, device=local_ids.device)
    positions[order] = ranked
    return torch.where(valid, positions.reshape(messages, topk), -1), counts[:num_local_experts]


def message_source(counts: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(source rank, slot) of each of ``total`` received messages, grouped by source.

    ``counts`` [R] are the messages from each source, on the device (no host sync).
    """
    counts = counts.long()
    src = torch.repeat_interleave(
        torch.arange(counts.numel(), device=counts.device), counts, output_size=total
    )
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(total, device=counts.device) - starts[src]
    return src, slot


def scatter_rows(rows: torch.Tensor, target: torch.Tensor, num_rows: int, fill: float | None) -> torch.Tensor:
    """out[target[i, k]] = rows[i] for every target >= 0, out [num_rows, ...]; no host sync.

    Entries with target -1 land in a spare row past the end, which is cut off.
    """
    width = rows.shape[1:]
    shape = (num_rows + 1, *width)
    raw = rows.dtype == torch.float8_e8m0fnu  # index_put has no kernel for it: move bytes
    data = rows.view(torch.uint8) if raw else rows
    if fill is None:
        out = torch.empty(shape, dtype=data.dtype, device=rows.device)
    else:
        out = torch.full(shape, fill, dtype=data.dtype, device=rows.device)
    copies = target.shape[1]
    index = torch.where(target >= 0, target, num_rows).reshape(-1)
    source = data.unsqueeze(1).expand(data.shape[0], copies, *data.shape[1:]).reshape(-1, *data.shape[1:])
    out[index] = source
    out = out[:num_rows]
    return out.view(rows.dtype) if raw else out


def sum_over_ranks(rows: torch.Tensor, positions: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """fp32 ``out[b] = Σ_d rows[start_d + positions[b, d]]`` over d with positions >= 0, in rank
    order; ``rows`` arrive grouped by rank, ``counts[d]`` each. No host sync."""
    counts = counts.long()
    starts = torch.cumsum(counts, 0) - counts
    spare = rows.shape[0]  # a zero row for the ranks a token did not go to
    padded = torch.cat([rows, rows.new_zeros((1, *rows.shape[1:]))])
    index = torch.where(positions >= 0, starts.unsqueeze(0) + positions.long(), spare)
    total = torch.zeros((positions.shape[0], *rows.shape[1:]), dtype=torch.float32, device=rows.device)
    for d in range(positions.shape[1]):
        total += padded[index[:, d]].float()
    return total
