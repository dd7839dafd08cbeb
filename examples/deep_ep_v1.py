"""A script written against DeepEP V1's API (``import deep_ep``) that runs on ncclep by flipping a
switch: one MoE step in low-latency mode (fp8 dispatch with a receive hook, combine into ``out``)
and one in high-throughput mode (layout, dispatch, combine), with experts that double their rows,
so every token must come back doubled and weighted.

Nothing here names ncclep. With DeepEP installed it runs on DeepEP (GPUs); with ncclep's alias
package and the switch it runs on ncclep, on GPUs or on CPU processes:

    pip install ./ncclep/deep_ep/alias      # once (or: PYTHONPATH=ncclep/deep_ep/alias)
    NCCLEP_DEEP_EP=1 python -m torch.distributed.run --nproc-per-node 2 examples/deep_ep_v1.py
"""

from __future__ import annotations

import os

import deep_ep
import torch
import torch.distributed as dist

NUM_TOKENS, HIDDEN, NUM_TOPK, EXPERTS_PER_RANK = 32, 1024, 4, 4


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - cosine similarity of x+1 and y+1 (the measure DeepEP's tests use)."""
    x, y = x.double() + 1, y.double() + 1
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())


def dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp8 rows [..., H] with one fp32 scale per 128 channels [..., H/128] back to fp32."""
    blocks = q.float().unflatten(-1, (-1, 128))
    return (blocks * scales.float().unsqueeze(-1)).flatten(-2)


def routing(num_experts: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.randn(NUM_TOKENS, num_experts, device=device).abs() + 1
    topk_idx = torch.topk(scores, NUM_TOPK, dim=-1).indices.to(deep_ep.topk_idx_t)
    topk_idx[torch.arange(0, NUM_TOKENS, 7, device=device), 0] = -1  # some choices left empty
    topk_weights = torch.rand(NUM_TOKENS, NUM_TOPK, device=device) + 0.1
    return topk_idx, topk_weights


def low_latency_step(
    buffer: deep_ep.Buffer, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor
) -> float:
    num_experts = EXPERTS_PER_RANK * buffer.group_size
    recv, recv_count, handle, _, hook = buffer.low_latency_dispatch(
        x, topk_idx, NUM_TOKENS, num_experts, use_fp8=True, return_recv_hook=True
    )
    hook()  # the tokens have arrived
    recv_x, recv_scales = recv
    expert_out = (dequantize(recv_x, recv_scales) * 2).to(torch.bfloat16)
    out = torch.empty_like(x)
    combined, _, _ = buffer.low_latency_combine(expert_out, topk_idx, topk_weights, handle, out=out)
    assert combined is out and int(recv_count.sum()) >= 0
    weight = topk_weights.masked_fill(topk_idx == -1, 0).sum(dim=1, keepdim=True)
    return calc_diff(combined, 2 * x * weight)


def high_throughput_step(
    buffer: deep_ep.Buffer, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor
) -> float:
    num_experts = EXPERTS_PER_RANK * buffer.group_size
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = (
        buffer.get_dispatch_layout(topk_idx, num_experts)
    )
    recv_x, recv_topk_idx, recv_topk_weights, num_recv_per_expert, handle, _ = buffer.dispatch(
        x,
        num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
        is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert,
        topk_idx=topk_idx,
        topk_weights=topk_weights,
        config=deep_ep.Buffer.get_dispatch_config(buffer.group_size),
    )
    assert sum(num_recv_per_expert) == int((recv_topk_idx >= 0).sum())
    # every local choice of a row: its expert doubles it, weighted; HT combine only sums
    weight = recv_topk_weights.masked_fill(recv_topk_idx == -1, 0).sum(dim=1, keepdim=True)
    expert_rows = (recv_x.float() * 2 * weight).to(torch.bfloat16)
    combined, _, _ = buffer.combine(
        expert_rows, handle, config=deep_ep.Buffer.get_combine_config(buffer.group_size)
    )
    weight = topk_weights.masked_fill(topk_idx == -1, 0).sum(dim=1, keepdim=True)
    return calc_diff(combined, 2 * x * weight)


def main() -> None:
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if gpu else "gloo")
    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(num_ranks)))
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    torch.manual_seed(rank)
    num_experts = EXPERTS_PER_RANK * num_ranks
    x = torch.randn(NUM_TOKENS, HIDDEN, device=device).to(torch.bfloat16)
    topk_idx, topk_weights = routing(num_experts, device)

    num_nvl_bytes = deep_ep.Config().get_nvl_buffer_size_hint(HIDDEN * 2, num_ranks)
    num_rdma_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(NUM_TOKENS, HIDDEN, num_ranks, num_experts)
    buffer = deep_ep.Buffer(
        group,
        num_nvl_bytes,
        num_rdma_bytes,
        low_latency_mode=True,
        num_qps_per_rank=EXPERTS_PER_RANK,
        explicitly_destroy=True,
    )
    ll = low_latency_step(buffer, x, topk_idx, topk_weights)
    buffer.clean_low_latency_buffer(NUM_TOKENS, HIDDEN, num_experts)
    ht = high_throughput_step(buffer, x, topk_idx, topk_weights)
    assert ll < 1e-3 and ht < 1e-5, (ll, ht)
    if rank == 0:
        print(f"deep_ep {deep_ep.Buffer.__module__}: LL ok (diff {ll:.2e}), HT ok (diff {ht:.2e})")
    buffer.destroy()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
