"""vLLM's own DeepEP prepare/finalize classes over ncclep.deep_ep, with no patching (imports vLLM:
only from tests/vllm).

Each rank switches the ``deep_ep`` alias on (``NCCLEP_DEEP_EP=1``, the alias package on the path),
so vLLM's ``import deep_ep`` gives ncclep.deep_ep; makes a Buffer with the arguments vLLM's DeepEP
all2all managers pass; wraps it in vLLM's ``DeepEPLLPrepareAndFinalize`` or
``DeepEPHTPrepareAndFinalize`` inside vLLM's ``FusedMoEKernel``; and compares the MoE layer with
vLLM's naive path on one process with every expert local.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import vllm.model_executor.layers.fused_moe.experts.fused_batched_moe as fused_batched_moe
import vllm.model_executor.layers.fused_moe.modular_kernel as mk
import vllm_workers
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import (
    FUSED_MOE_UNQUANTIZED_CONFIG,
    FusedMoEConfig,
)
from vllm.model_executor.layers.fused_moe.experts.fused_batched_moe import NaiveBatchedExperts
from vllm.model_executor.layers.fused_moe.prepare_finalize import BatchedPrepareAndFinalize

ALIAS = Path(__file__).resolve().parents[2] / "ncclep" / "deep_ep" / "alias"

# DeepEP LL (and so vLLM's DeepEPLLPrepareAndFinalize) takes hidden sizes from 2048 up only.
LL_HIDDEN = 2048
EXPERTS, TOPK, INTER, MAX_TOKENS = (
    vllm_workers.EXPERTS,
    vllm_workers.TOPK,
    vllm_workers.INTER,
    vllm_workers.MAX_TOKENS,
)


def use_shim() -> Any:
    """Switch the alias on in this process and return ``deep_ep`` (ncclep's)."""
    os.environ["NCCLEP_DEEP_EP"] = "1"
    if str(ALIAS) not in sys.path:
        sys.path.insert(0, str(ALIAS))
    fused_batched_moe._is_capturing_or_compiling = torch.compiler.is_compiling  # CPU: nothing is captured
    import deep_ep

    import ncclep.deep_ep

    assert deep_ep.Buffer is ncclep.deep_ep.Buffer, deep_ep.__file__
    return deep_ep


def ll_moe_config(ep: bool) -> FusedMoEConfig:
    """The LL layer: vllm_workers' config at the hidden size DeepEP's LL kernels take."""
    return vllm_workers.moe_config("deepep_low_latency" if ep else "naive", ep, hidden=LL_HIDDEN)


def ll_weights() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4321)
    w1 = (torch.randn(EXPERTS, 2 * INTER, LL_HIDDEN, generator=g) / 45).to(torch.bfloat16)
    w2 = (torch.randn(EXPERTS, LL_HIDDEN, INTER, generator=g) / 12).to(torch.bfloat16)
    return w1, w2


def ll_inputs(case: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rank = dist.get_rank()
    tokens = vllm_workers.CASES[case][rank]
    g = torch.Generator().manual_seed(300 * case + rank)
    x = (torch.randn(tokens, LL_HIDDEN, generator=g) * (torch.rand(tokens, 1, generator=g) + 0.5)).to(
        torch.bfloat16
    )
    if vllm_workers.CASES[case][2] == "hot":
        local = EXPERTS // dist.get_world_size()
        ids = torch.rand(tokens, local, generator=g).argsort(dim=1)[:, :TOPK] + (EXPERTS - local)
    else:
        ids = torch.rand(tokens, EXPERTS, generator=g).argsort(dim=1)[:, :TOPK]
    w = torch.softmax(torch.randn(tokens, TOPK, generator=g), dim=-1).float()
    return x, ids.reshape(tokens, TOPK).to(torch.int64), w


def ll_naive(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    w1, w2 = ll_weights()
    pf = BatchedPrepareAndFinalize(
        max_num_tokens=MAX_TOKENS, num_local_experts=EXPERTS, num_dispatchers=1, rank=0
    )
    experts = NaiveBatchedExperts(
        ll_moe_config(ep=False), FUSED_MOE_UNQUANTIZED_CONFIG, max_num_tokens=MAX_TOKENS, num_dispatchers=1
    )
    return mk.FusedMoEKernel(pf, experts).apply(x, w1, w2, w, ids, MoEActivation.SILU, EXPERTS, None, False)


def ll_buffer(deep_ep: Any) -> Any:
    """A Buffer with the arguments vLLM's DeepEPLLAll2AllManager passes (its gloo cpu_group)."""
    world = dist.get_world_size()
    return deep_ep.Buffer(
        group=dist.group.WORLD,
        num_nvl_bytes=1024 * 1024 * 1024,
        num_rdma_bytes=deep_ep.Buffer.get_low_latency_rdma_size_hint(
            num_max_dispatch_tokens_per_rank=MAX_TOKENS,
            hidden=LL_HIDDEN,
            num_ranks=world,
            num_experts=EXPERTS,
        ),
        low_latency_mode=True,
        num_qps_per_rank=EXPERTS // world,
        allow_nvlink_for_low_latency_mode=True,
        allow_mnnvl=False,
        explicitly_destroy=True,
        enable_shrink=False,
    )


def ll_kernel_worker() -> list[dict[str, float]]:
    """vLLM's DeepEPLLPrepareAndFinalize over the shim in FusedMoEKernel == vLLM's naive batched path."""
    deep_ep = use_shim()
    from vllm.model_executor.layers.fused_moe.prepare_finalize.deepep_ll import DeepEPLLPrepareAndFinalize

    world = dist.get_world_size()
    buffer = ll_buffer(deep_ep)
    pf = DeepEPLLPrepareAndFinalize(buffer, max_tokens_per_rank=MAX_TOKENS, num_dispatchers=world)
    experts = NaiveBatchedExperts(
        ll_moe_config(ep=True), FUSED_MOE_UNQUANTIZED_CONFIG, max_num_tokens=MAX_TOKENS, num_dispatchers=world
    )
    kernel = mk.FusedMoEKernel(pf, experts)
    w1, w2 = ll_weights()
    local = EXPERTS // world
    mine = slice(dist.get_rank() * local, (dist.get_rank() + 1) * local)
    results = []
    try:
        for case in range(len(vllm_workers.CASES)):
            x, ids, w = ll_inputs(case)
            out = kernel.apply(x, w1[mine], w2[mine], w, ids, MoEActivation.SILU, EXPERTS, None, False)
            results.append(vllm_workers.check_close(out, ll_naive(x, ids, w), f"DeepEP LL case {case}"))
    finally:
        buffer.destroy()
    return results


def ll_fp8_prepare_worker() -> dict[str, Any]:
    """fp8 dispatch ([128, 128] blocks): vLLM's prepare hands the experts DeepEP's e4m3 rows and fp32
    scales ``[E_local, T*R, H/128]``, column-major, that dequantise to tokens some rank sent."""
    deep_ep = use_shim()
    from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config
    from vllm.model_executor.layers.fused_moe.prepare_finalize.deepep_ll import DeepEPLLPrepareAndFinalize

    from ncclep import fp8

    world = dist.get_world_size()
    local = EXPERTS // world
    quant = fp8_w8a8_moe_quant_config(
        w1_scale=torch.ones(EXPERTS, 2 * INTER // 128, LL_HIDDEN // 128),
        w2_scale=torch.ones(EXPERTS, LL_HIDDEN // 128, INTER // 128),
        block_shape=[128, 128],
    )
    buffer = ll_buffer(deep_ep)
    pf = DeepEPLLPrepareAndFinalize(buffer, MAX_TOKENS, world, use_fp8_dispatch=True)
    try:
        x, ids, w = ll_inputs(0)
        rows, scales, meta, _, _ = pf.prepare(x, w, ids, EXPERTS, None, False, quant)
        assert rows.dtype == fp8.FP8_DTYPE and tuple(rows.shape) == (local, world * MAX_TOKENS, LL_HIDDEN)
        assert scales.dtype == torch.float32 and tuple(scales.shape) == (
            local,
            world * MAX_TOKENS,
            LL_HIDDEN // 128,
        )
        assert scales.transpose(1, 2).is_contiguous(), scales.stride()  # column-major, as DeepEP's
        sent = [torch.zeros(MAX_TOKENS, LL_HIDDEN, dtype=torch.bfloat16) for _ in range(world)]
        padded = torch.zeros(MAX_TOKENS, LL_HIDDEN, dtype=torch.bfloat16)
        padded[: x.shape[0]] = x
        dist.all_gather(sent, padded)
        candidates = torch.cat(sent).float()
        checked = 0
        for e, n in enumerate(meta.expert_num_tokens.tolist()):
            for row in fp8.dequantize(rows[e, :n], scales[e, :n].contiguous()):
                err = (candidates - row).abs().amax(dim=1).min()
                assert float(err) <= float(row.abs().max()) / 8, float(err)
                checked += 1
        return {"rows": checked}
    finally:
        buffer.destroy()


def ht_kernel_worker() -> list[dict[str, float]]:
    """vLLM's DeepEPHTPrepareAndFinalize over the shim in FusedMoEKernel == vLLM's no-EP path.

    The experts reduce themselves (vLLM's own reduction in this finalize is a CUDA op)."""
    deep_ep = use_shim()
    from vllm.model_executor.layers.fused_moe.prepare_finalize.deepep_ht import DeepEPHTPrepareAndFinalize

    rank, world = dist.get_rank(), dist.get_world_size()
    local = vllm_workers.EXPERTS // world
    buffer = deep_ep.Buffer(  # DeepEPHTAll2AllManager's arguments on one node
        group=dist.group.WORLD,
        num_nvl_bytes=1024 * 1024 * 1024,
        num_rdma_bytes=0,
        low_latency_mode=False,
        num_qps_per_rank=1,
        explicitly_destroy=True,
    )
    pf = DeepEPHTPrepareAndFinalize(
        buffer, num_dispatchers=world, dp_size=world, rank_expert_offset=rank * local
    )
    moe = vllm_workers.moe_config("deepep_high_throughput", ep=True)
    kernel = mk.FusedMoEKernel(pf, vllm_workers.ReducingTorchExperts(moe, FUSED_MOE_UNQUANTIZED_CONFIG))
    w1, w2 = vllm_workers.weights()
    mine = vllm_workers.local_slice()
    expert_map = torch.full((vllm_workers.EXPERTS,), -1, dtype=torch.int32)
    expert_map[mine] = torch.arange(local, dtype=torch.int32)
    results = []
    try:
        for case in range(len(vllm_workers.CASES)):
            x, ids, w = vllm_workers.inputs(case)
            out = kernel.apply(
                x, w1[mine], w2[mine], w, ids, MoEActivation.SILU, vllm_workers.EXPERTS, expert_map, False
            )
            results.append(
                vllm_workers.check_close(
                    out, vllm_workers.naive_standard(x, ids, w), f"DeepEP HT case {case}"
                )
            )
    finally:
        buffer.destroy()
    return results
