"""What the vLLM plugin tests run on each rank of a gloo pool (imports vLLM: only from tests/vllm).

Every rank builds vLLM's own objects (``FusedMoEConfig``, ``maybe_make_prepare_finalize``,
``FusedMoEKernel``, ``NaiveBatchedExperts``) around the plugin's classes, runs an MoE layer over
ncclep's reference backend, and compares with vLLM's naive path on one process with every expert
local (``BatchedPrepareAndFinalize`` for the batched format, ``MoEPrepareAndFinalizeNoDPEPModular``
for the standard one).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import vllm.model_executor.layers.fused_moe.experts.fused_batched_moe as fused_batched_moe
import vllm.model_executor.layers.fused_moe.modular_kernel as mk
from vllm.config import ModelConfig, SchedulerConfig, VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.all2all_utils import maybe_make_prepare_finalize
from vllm.model_executor.layers.fused_moe.config import (
    FUSED_MOE_UNQUANTIZED_CONFIG,
    FusedMoEConfig,
    FusedMoEParallelConfig,
    RoutingMethodType,
)
from vllm.model_executor.layers.fused_moe.experts.fused_batched_moe import NaiveBatchedExperts
from vllm.model_executor.layers.fused_moe.prepare_finalize import (
    BatchedPrepareAndFinalize,
    make_moe_prepare_and_finalize_no_dp_ep,
)
from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
    TopKWeightAndReduceDelegate,
    TopKWeightAndReduceNoOP,
)

from ncclep.vllm import patch
from ncclep.vllm.all2all import NcclepHTAll2AllManager, NcclepLLAll2AllManager
from ncclep.vllm.prepare_finalize import NcclepHTPrepareAndFinalize, NcclepLLPrepareAndFinalize

EXPERTS, TOPK, HIDDEN, INTER, MAX_TOKENS = 8, 2, 256, 128, 6
HT_MAX_BATCHED_TOKENS = 64

# (tokens on rank 0, tokens on rank 1, routing): random, a zero-token rank 1, everything to one rank.
CASES = [(5, 6, "random"), (4, 0, "random"), (0, 3, "random"), (6, 5, "hot")]


def setup_rank() -> None:
    """Swap the classes (as the entry point does with VLLM_NCCLEP=1) and make the naive experts run on CPU.

    ``NaiveBatchedExperts`` asks ``torch.accelerator.current_stream()`` whether a CUDA graph is
    being captured, which raises where there is no accelerator; on CPU nothing is captured.
    """
    patch.apply()
    fused_batched_moe._is_capturing_or_compiling = torch.compiler.is_compiling


def parallel_config(backend: str, rank: int, world: int, ep: bool) -> FusedMoEParallelConfig:
    size = world if ep else 1
    return FusedMoEParallelConfig(
        tp_size=1,
        pcp_size=1,
        dp_size=size,
        ep_size=size,
        tp_rank=0,
        pcp_rank=0,
        dp_rank=rank if ep else 0,
        ep_rank=rank if ep else 0,
        sp_size=1,
        use_ep=ep,
        all2all_backend=backend,
        enable_eplb=False,
    )


def moe_config(backend: str, ep: bool, hidden: int = HIDDEN) -> FusedMoEConfig:
    rank, world = (dist.get_rank(), dist.get_world_size()) if ep else (0, 1)
    return FusedMoEConfig(
        num_experts=EXPERTS,
        experts_per_token=TOPK,
        hidden_dim=hidden,
        intermediate_size=INTER,
        num_local_experts=EXPERTS // world,
        num_logical_experts=EXPERTS,
        activation=MoEActivation.SILU,
        device="cpu",
        routing_method=RoutingMethodType.TopK,
        moe_parallel_config=parallel_config(backend, rank, world, ep),
        in_dtype=torch.bfloat16,
        max_num_tokens=MAX_TOKENS,
    )


def tiny_vllm_config(directory: str) -> VllmConfig:
    """A real VllmConfig for a small Qwen2-MoE shape (config.json only, no weights, no tokenizer)."""
    config = {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * INTER,
        "moe_intermediate_size": INTER,
        "shared_expert_intermediate_size": 0,
        "num_experts": EXPERTS,
        "num_experts_per_tok": TOPK,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 128,
        "max_position_embeddings": 256,
        "torch_dtype": "bfloat16",
        "decoder_sparse_step": 1,
        "norm_topk_prob": False,
    }
    (Path(directory) / "config.json").write_text(json.dumps(config))
    model = ModelConfig(model=directory, skip_tokenizer_init=True, dtype="bfloat16")
    scheduler = SchedulerConfig(
        max_num_batched_tokens=HT_MAX_BATCHED_TOKENS,
        max_num_seqs=16,
        max_model_len=256,
        is_encoder_decoder=False,
    )
    return VllmConfig(model_config=model, scheduler_config=scheduler)


class TorchExperts(mk.FusedMoEExpertsModular):
    """Standard-format experts in plain PyTorch (vLLM ships none that runs on CPU without prepacking).

    Writes each (token, choice) output unweighted into ``[M, topk, H]`` and leaves the weighting
    and the top-k sum to the prepare/finalize (``TopKWeightAndReduceDelegate``), so the finalize's
    own reduction is what gets tested. Honors ``expert_map`` (global id -> local id or -1).
    """

    @staticmethod
    def activation_format() -> mk.FusedMoEActivationFormat:
        return mk.FusedMoEActivationFormat.Standard

    @staticmethod
    def _supports_current_device() -> bool:
        return True

    @staticmethod
    def _supports_no_act_and_mul() -> bool:
        return False

    @staticmethod
    def _supports_quant_scheme(weight_key: Any, activation_key: Any) -> bool:
        return (weight_key, activation_key) == (None, None)

    @staticmethod
    def _supports_activation(activation: MoEActivation) -> bool:
        return activation == MoEActivation.SILU

    @staticmethod
    def _supports_parallel_config(moe_parallel_config: FusedMoEParallelConfig) -> bool:
        return True

    reduces = False  # True: apply the top-k weights and sum here (vLLM's own CPU reduction is a CUDA op)

    def finalize_weight_and_reduce_impl(self) -> mk.TopKWeightAndReduce:
        return TopKWeightAndReduceNoOP() if self.reduces else TopKWeightAndReduceDelegate()

    def workspace_shapes(self, M: int, N: int, K: int, topk: int, *args: Any) -> tuple[tuple[int, ...], ...]:
        return (M, topk, K), (M, topk, K), ((M, K) if self.reduces else (M, topk, K))

    def apply(
        self,
        output: torch.Tensor,
        hidden_states: torch.Tensor,
        w1: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        activation: MoEActivation,
        global_num_experts: int,
        expert_map: torch.Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        ids = topk_ids.long() if expert_map is None else expert_map[topk_ids.long()]
        per_choice = torch.zeros(*ids.shape, hidden_states.shape[-1])
        for e in range(w1.shape[0]):
            rows, slots = (ids == e).nonzero(as_tuple=True)
            if rows.numel():
                per_choice[rows, slots] = expert_mlp(hidden_states[rows], w1[e], w2[e])
        if self.reduces:
            output.copy_((per_choice * topk_weights.float().unsqueeze(-1)).sum(dim=1).to(output.dtype))
        else:
            output.copy_(per_choice.to(output.dtype))


class ReducingTorchExperts(TorchExperts):
    reduces = True


def expert_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    h = x.float() @ w1.float().t()
    half = h.shape[-1] // 2
    return (torch.nn.functional.silu(h[:, :half]) * h[:, half:]) @ w2.float().t()


def weights() -> tuple[torch.Tensor, torch.Tensor]:
    """The same expert weights on every rank: w1 [E, 2I, H], w2 [E, H, I]."""
    g = torch.Generator().manual_seed(1234)
    w1 = (torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=g) / 16).to(torch.bfloat16)
    w2 = (torch.randn(EXPERTS, HIDDEN, INTER, generator=g) / 12).to(torch.bfloat16)
    return w1, w2


def inputs(case: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rank, world = dist.get_rank(), dist.get_world_size()
    tokens = CASES[case][rank]
    kind = CASES[case][2]
    g = torch.Generator().manual_seed(100 * case + rank)
    scale = torch.rand(tokens, 1, generator=g) + 0.5
    x = (torch.randn(tokens, HIDDEN, generator=g) * scale).to(torch.bfloat16)
    if kind == "hot":  # every token to the last rank's experts
        local = EXPERTS // world
        ids = torch.rand(tokens, local, generator=g).argsort(dim=1)[:, :TOPK] + (EXPERTS - local)
    else:
        ids = torch.rand(tokens, EXPERTS, generator=g).argsort(dim=1)[:, :TOPK]
    ids = ids.reshape(tokens, TOPK).to(torch.int64)
    w = torch.softmax(torch.randn(tokens, TOPK, generator=g), dim=-1).float()
    return x, ids, w


def check_close(out: torch.Tensor, ref: torch.Tensor, what: str) -> dict[str, float]:
    assert out.shape == ref.shape and out.dtype == ref.dtype, f"{what}: {out.shape} vs {ref.shape}"
    if ref.numel() == 0:
        return {"max_err": 0.0, "scale": 0.0}
    err = float((out.float() - ref.float()).abs().max())
    scale = float(ref.float().abs().max())
    # Both sides are bf16 results of fp32 sums in different orders: a few bf16 roundings apart.
    assert err <= 2**-6 * scale + 1e-6, f"{what}: max |ours - naive| = {err:.4g} (max |naive| = {scale:.4g})"
    return {"max_err": err, "scale": scale}


def local_slice() -> slice:
    rank, world = dist.get_rank(), dist.get_world_size()
    local = EXPERTS // world
    return slice(rank * local, (rank + 1) * local)


def naive_batched(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """vLLM's batched path without EP: every expert local, BatchedPrepareAndFinalize + NaiveBatchedExperts."""
    w1, w2 = weights()
    moe = moe_config("naive", ep=False)
    pf = BatchedPrepareAndFinalize(
        max_num_tokens=MAX_TOKENS, num_local_experts=EXPERTS, num_dispatchers=1, rank=0
    )
    experts = NaiveBatchedExperts(
        moe, FUSED_MOE_UNQUANTIZED_CONFIG, max_num_tokens=MAX_TOKENS, num_dispatchers=1
    )
    kernel = mk.FusedMoEKernel(pf, experts)
    return kernel.apply(x, w1, w2, w, ids, MoEActivation.SILU, EXPERTS, None, False)


def naive_standard(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """vLLM's standard path without EP or DP: every expert local, MoEPrepareAndFinalizeNoDPEPModular."""
    w1, w2 = weights()
    moe = moe_config("naive", ep=False)
    kernel = mk.FusedMoEKernel(
        make_moe_prepare_and_finalize_no_dp_ep(use_monolithic=False),
        ReducingTorchExperts(moe, FUSED_MOE_UNQUANTIZED_CONFIG),
    )
    return kernel.apply(x, w1, w2, w, ids, MoEActivation.SILU, EXPERTS, None, False)


def build_ll(manager: NcclepLLAll2AllManager | None = None) -> tuple[NcclepLLAll2AllManager, Any]:
    manager = manager or NcclepLLAll2AllManager.for_process_group()
    moe = moe_config("deepep_low_latency", ep=True)
    pf = maybe_make_prepare_finalize(moe, FUSED_MOE_UNQUANTIZED_CONFIG, all2all_manager=manager)
    return manager, pf


def build_ht(directory: str) -> tuple[NcclepHTAll2AllManager, Any]:
    manager = NcclepHTAll2AllManager.for_process_group()
    moe = moe_config("deepep_high_throughput", ep=True)
    with set_current_vllm_config(tiny_vllm_config(directory)):
        pf = maybe_make_prepare_finalize(moe, FUSED_MOE_UNQUANTIZED_CONFIG, all2all_manager=manager)
    return manager, pf


def make_prepare_finalize_worker() -> dict[str, Any]:
    """maybe_make_prepare_finalize builds ncclep's classes for both backends, groups of the right sizes."""
    setup_rank()
    manager, ll = build_ll()
    assert type(ll) is NcclepLLPrepareAndFinalize, type(ll)
    assert ll.group.mode == "ll" and ll.group.num_experts == EXPERTS
    assert ll.max_num_tokens_per_rank() == MAX_TOKENS and ll.num_dispatchers() == dist.get_world_size()
    assert not ll.use_fp8_dispatch
    # A second layer with the same sizes shares the group (vLLM asks once per layer).
    _, again = build_ll(manager)
    assert again is not ll and again.group is ll.group
    assert (
        manager.get_handle(
            dict(
                max_num_tokens_per_dp_rank=MAX_TOKENS,
                token_hidden_size=HIDDEN,
                num_ep_ranks=dist.get_world_size(),
                num_global_experts=EXPERTS,
                num_local_experts=EXPERTS // dist.get_world_size(),
            )
        )
        is ll.group
    )
    manager.destroy()
    assert ll.group.closed
    with tempfile.TemporaryDirectory() as directory:
        ht_manager, ht = build_ht(directory)
    assert type(ht) is NcclepHTPrepareAndFinalize, type(ht)
    cfg = ht.group.config
    sizes = (cfg.mode, cfg.num_experts, cfg.max_tokens_per_rank, cfg.hidden, cfg.max_topk)
    assert sizes == ("ht", EXPERTS, HT_MAX_BATCHED_TOKENS, HIDDEN, TOPK), sizes
    assert ht.rank_expert_offset == dist.get_rank() * (EXPERTS // dist.get_world_size())
    ht_manager.destroy()
    return {"ll": repr(ll.group), "ht": repr(ht.group)}


def ll_kernel_worker() -> list[dict[str, float]]:
    """ncclep LL inside vLLM's FusedMoEKernel with NaiveBatchedExperts == vLLM's naive batched path."""
    setup_rank()
    manager, pf = build_ll()
    w1, w2 = weights()
    mine = local_slice()
    moe = moe_config("deepep_low_latency", ep=True)
    experts = NaiveBatchedExperts(
        moe, FUSED_MOE_UNQUANTIZED_CONFIG, max_num_tokens=pf.max_num_tokens_per_rank(), num_dispatchers=2
    )
    kernel = mk.FusedMoEKernel(pf, experts)
    results = []
    try:
        for case in range(len(CASES)):
            x, ids, w = inputs(case)
            out = kernel.apply(x, w1[mine], w2[mine], w, ids, MoEActivation.SILU, EXPERTS, None, False)
            results.append(check_close(out, naive_batched(x, ids, w), f"LL case {case}"))
            # The synchronous prepare(): same batched rows and counts as the async one the kernel used.
            rows, scales, meta, no_ids, no_weights = pf.prepare(
                x, w, ids, EXPERTS, None, False, FUSED_MOE_UNQUANTIZED_CONFIG
            )
            assert scales is None and no_ids is None and no_weights is None
            assert rows.shape == (EXPERTS // 2, 2 * MAX_TOKENS, HIDDEN) and rows.dtype == torch.bfloat16
            counts = meta.expert_num_tokens
            assert counts.dtype == torch.int32 and meta.expert_num_tokens_cpu is None
            expected = torch.bincount(ids.flatten(), minlength=EXPERTS)
            gathered = [torch.zeros_like(expected) for _ in range(2)]
            dist.all_gather(gathered, expected)
            assert torch.equal(counts.long(), sum(gathered)[mine]), (counts, sum(gathered))
    finally:
        manager.destroy()
    return results


def ht_kernel_worker() -> list[dict[str, float]]:
    """ncclep HT inside vLLM's FusedMoEKernel with standard-format experts == vLLM's no-EP path."""
    setup_rank()
    with tempfile.TemporaryDirectory() as directory:
        manager, pf = build_ht(directory)
    w1, w2 = weights()
    mine = local_slice()
    expert_map = torch.full((EXPERTS,), -1, dtype=torch.int32)
    expert_map[mine] = torch.arange(mine.stop - mine.start, dtype=torch.int32)
    moe = moe_config("deepep_high_throughput", ep=True)
    kernel = mk.FusedMoEKernel(pf, TorchExperts(moe, FUSED_MOE_UNQUANTIZED_CONFIG))
    results = []
    try:
        for case in range(len(CASES)):
            x, ids, w = inputs(case)
            out = kernel.apply(x, w1[mine], w2[mine], w, ids, MoEActivation.SILU, EXPERTS, expert_map, False)
            results.append(check_close(out, naive_standard(x, ids, w), f"HT case {case}"))
            # What prepare hands the experts: global ids, each row's local choices kept.
            rows, scales, meta, got_ids, got_w = pf.prepare(
                x, w, ids, EXPERTS, expert_map, False, FUSED_MOE_UNQUANTIZED_CONFIG
            )
            assert scales is None and got_ids.dtype == torch.int64 and got_ids.shape[0] == rows.shape[0]
            assert bool(((got_ids >= 0) & (got_ids < EXPERTS)).all()), got_ids
            local = expert_map[got_ids] >= 0
            assert int(meta.expert_num_tokens_cpu.sum()) == int(local.sum())
            finish = pf.finalize_async(
                torch.empty_like(x),
                rows.new_zeros(rows.shape[0], TOPK, HIDDEN),
                got_w,
                got_ids,
                False,
                TopKWeightAndReduceDelegate(),
            )
            finish()
    finally:
        manager.destroy()
    return results


def ll_fp8_prepare_worker() -> dict[str, Any]:
    """fp8 block quantisation ([128, 128], as DEEPEP_QUANT_BLOCK_SHAPE): ncclep quantises in the dispatch
    and prepare hands the experts e4m3 rows with fp32 scales [E_local, T*R, H/128], token-major."""
    from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config
    from vllm.platforms import current_platform

    from ncclep import fp8

    setup_rank()
    local = EXPERTS // dist.get_world_size()
    quant = fp8_w8a8_moe_quant_config(
        w1_scale=torch.ones(EXPERTS, 2 * INTER // 128, HIDDEN // 128),
        w2_scale=torch.ones(EXPERTS, HIDDEN // 128, INTER // 128),
        block_shape=[128, 128],
    )
    assert quant.quant_dtype == current_platform.fp8_dtype()
    manager = NcclepLLAll2AllManager.for_process_group()
    pf = maybe_make_prepare_finalize(
        moe_config("deepep_low_latency", ep=True), quant, all2all_manager=manager
    )
    try:
        assert pf.use_fp8_dispatch
        x, ids, w = inputs(0)
        rows, scales, meta, _, _ = pf.prepare(x, w, ids, EXPERTS, None, False, quant)
        assert rows.dtype == fp8.FP8_DTYPE and rows.shape == (local, 2 * MAX_TOKENS, HIDDEN)
        assert scales.dtype == torch.float32 and scales.shape == (local, 2 * MAX_TOKENS, HIDDEN // 128)
        assert scales.stride(1) == 1, scales.stride()  # token-major, as DeepEP returns them
        # Every received row dequantises to a token some rank sent to this expert.
        sent = [torch.zeros(MAX_TOKENS, HIDDEN, dtype=torch.bfloat16) for _ in range(2)]
        padded = torch.zeros(MAX_TOKENS, HIDDEN, dtype=torch.bfloat16)
        padded[: x.shape[0]] = x
        dist.all_gather(sent, padded)
        candidates = torch.cat(sent).float()
        checked = 0
        for e, n in enumerate(meta.expert_num_tokens.tolist()):
            values = fp8.dequantize(rows[e, :n], scales[e, :n])
            for row in values:
                err = (candidates - row).abs().amax(dim=1).min()
                assert float(err) <= float(row.abs().max()) / 8, float(err)
                checked += 1
        return {"rows": checked}
    finally:
        manager.destroy()
