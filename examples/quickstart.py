"""ncclep's four ops in one short script: an LL dispatch/combine and an HT dispatch/combine, with
"experts" that multiply by two, so every token must come back doubled.

    python -m torch.distributed.run --nproc-per-node 2 examples/quickstart.py     # CPU: gloo
    python -m torch.distributed.run --nproc-per-node 4 examples/quickstart.py     # GPUs: NCCL

On CPU the group runs the reference backend (pure PyTorch over torch.distributed); with one GPU
per process and the CUDA extension built, the CUDA kernels.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

try:
    import ncclep
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import ncclep


def routing(tokens: int, experts: int, topk: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k distinct experts per token ([B, K] int64) and weights that sum to one ([B, K] fp32)."""
    g = torch.Generator().manual_seed(seed)
    topk_idx = torch.rand(tokens, experts, generator=g).topk(topk, dim=1).indices
    topk_weights = torch.rand(tokens, topk, generator=g) + 0.1
    return topk_idx, topk_weights / topk_weights.sum(dim=1, keepdim=True)


def main() -> None:
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if gpu else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    experts, tokens, hidden, topk = 8 * dist.get_world_size(), 64, 512, 4

    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    topk_idx, topk_weights = routing(tokens, experts, topk, seed=100 + rank)
    x, topk_idx, topk_weights = x.to(device), topk_idx.to(device), topk_weights.to(device)

    # LL (decode): expert-major rows [L, R*T, H] (bf16: no scales); combine applies the weights.
    with ncclep.Group(experts, tokens, hidden, mode="ll", max_topk=topk) as group:
        recv_x, _scales, expert_counts, handle = group.ll_dispatch(x, topk_idx, topk_weights)
        expert_out = recv_x * 2  # the experts; rows past expert_counts[e] are padding
        y = group.ll_combine(expert_out, handle)  # [B, H] = Σ_k w[b,k] · 2·x[b] = 2·x[b]
        torch.testing.assert_close(y.float(), 2 * x.float(), rtol=2e-2, atol=2e-2)
        if rank == 0:
            print(f"LL: {group}: received {int(expert_counts.sum())} rows on rank 0, combine ok")

    # HT (prefill, training): one row per received token (flat layout), weights applied by you.
    with ncclep.Group(experts, tokens, hidden, mode="ht", max_topk=topk) as group:
        out = group.ht_dispatch(x, topk_idx, topk_weights)
        local = out.topk_idx >= 0  # the row's choices that are experts of this rank
        w = torch.where(local, out.topk_weights, 0.0).sum(dim=1, keepdim=True)
        rows = (out.x.float() * 2 * w).to(torch.bfloat16)  # this rank's share of each token
        y, _ = group.ht_combine(rows, out.handle)  # [B, H]: the sum over the ranks a token went to
        torch.testing.assert_close(y.float(), 2 * x.float(), rtol=2e-2, atol=2e-2)
        if rank == 0:
            print(f"HT: {group}: received {int(out.num_recv)} rows on rank 0, combine ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
