"""What vLLM does around a prepare/finalize object, in the same calls (vLLM 0.32):

* :func:`make_prepare_finalize`: ``maybe_make_prepare_finalize`` for the two DeepEP backends (the
  manager's ``get_handle`` arguments, the constructor arguments, the fp8-dispatch decision);
* :class:`KernelCalls`: ``FusedMoEKernel`` (``modular_kernel.py``): ``post_init_setup`` at
  construction, then per forward ``output = empty_like(x)``, ``prepare_async`` -> hook ->
  receiver (or ``prepare``), the experts, ``finalize_async`` -> hook -> receiver (or ``finalize``);
* :class:`HarnessExperts`: what a ``FusedMoEExperts`` object tells the prepare/finalize (format,
  packed UE8M0 scales, weight-and-reduce) around the pure-PyTorch experts of :mod:`.experts`.

Import this only after :func:`.stand_ins.ensure_vllm`.
"""

from __future__ import annotations

from typing import Any

import torch
import vllm.model_executor.layers.fused_moe.modular_kernel as mk
from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
    TopKWeightAndReduceContiguous,
    TopKWeightAndReduceDelegate,
    TopKWeightAndReduceNoOP,
)
from vllm.v1.worker.ubatching import dbo_maybe_run_recv_hook

from ncclep.vllm.prepare_finalize import NcclepHTPrepareAndFinalize, NcclepLLPrepareAndFinalize

from .experts import ExpertWeights, batched_experts, standard_experts

FP8 = torch.float8_e4m3fn  # current_platform.fp8_dtype() on CUDA
DEEPEP_QUANT_BLOCK_SHAPE = [128, 128]


def quant_config(quant: str) -> FusedMoEQuantConfig:
    """Unquantised, or fp8 activations in [128, 128] blocks (as DeepSeek-V3's fp8 checkpoints)."""
    if quant == "bf16":
        return FusedMoEQuantConfig.make()
    return FusedMoEQuantConfig.make(quant_dtype=FP8, block_shape=list(DEEPEP_QUANT_BLOCK_SHAPE))


def make_prepare_finalize(
    mode: str,
    manager: Any,
    num_experts: int,
    hidden: int,
    max_tokens: int,
    max_topk: int,
    quant: FusedMoEQuantConfig,
    routing_tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> Any:
    world = manager.world_size
    num_local_experts = num_experts // world
    if mode == "ht":
        # vLLM passes {} and the manager sizes the group from the vLLM config; outside an engine the
        # same sizes are given (see NcclepHTAll2AllManager).
        sizes = dict(
            num_experts=num_experts, max_tokens_per_rank=max_tokens, hidden=hidden, max_topk=max_topk
        )
        return NcclepHTPrepareAndFinalize(
            manager.get_handle(sizes),
            num_dispatchers=world,
            dp_size=manager.dp_world_size,
            rank_expert_offset=manager.rank * num_local_experts,
        )
    handle = manager.get_handle(
        dict(
            max_num_tokens_per_dp_rank=max_tokens,
            token_hidden_size=hidden,
            num_ep_ranks=world,
            num_global_experts=num_experts,
            num_local_experts=num_local_experts,
        )
    )
    g2p, p2g, local_ids = routing_tables if routing_tables is not None else (None, None, None)
    return NcclepLLPrepareAndFinalize(
        handle,
        max_tokens_per_rank=max_tokens,
        num_dispatchers=world,
        use_fp8_dispatch=quant.quant_dtype == FP8 and quant.block_shape == DEEPEP_QUANT_BLOCK_SHAPE,
        global_to_physical=g2p,
        physical_to_global=p2g,
        local_expert_global_ids=local_ids,
    )


class HarnessExperts:
    """The experts' side of the contract. ``reduce``: ``"delegate"`` (the finalize weighs and sums),
    ``"contiguous"`` (the experts ask for vLLM's ``TopKWeightAndReduceContiguous``) or ``"noop"``
    (the experts weigh and sum themselves). ``problems`` collects what they find wrong in what the
    prepare handed them."""

    expects_unquantized_inputs = False

    def __init__(
        self,
        mode: str,
        weights: ExpertWeights,
        local: slice,
        quant: FusedMoEQuantConfig,
        packed_ue8m0: bool = False,
        reduce: str = "delegate",
    ) -> None:
        self.mode = mode
        self.weights = weights
        self.local = local
        self.quant_config = quant
        self.packed_ue8m0 = packed_ue8m0
        self.reduce = reduce
        self.problems: list[str] = []

    def activation_format(self) -> mk.FusedMoEActivationFormat:
        if self.mode == "ll":
            return mk.FusedMoEActivationFormat.BatchedExperts
        return mk.FusedMoEActivationFormat.Standard

    def supports_packed_ue8m0_act_scales(self) -> bool:
        return self.packed_ue8m0

    def finalize_weight_and_reduce_impl(self) -> mk.TopKWeightAndReduce:
        return {
            "delegate": TopKWeightAndReduceDelegate,
            "contiguous": TopKWeightAndReduceContiguous,
            "noop": TopKWeightAndReduceNoOP,
        }[self.reduce]()

    def _expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.problems.append(what)

    def apply(
        self,
        a1q: torch.Tensor,
        a1q_scale: torch.Tensor | None,
        meta: mk.ExpertTokensMetadata | None,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        expert_map: torch.Tensor,
        apply_router_weight_on_input: bool,
    ) -> torch.Tensor:
        fp8 = self.quant_config.quant_dtype == FP8
        self._expect(a1q.dtype == (FP8 if fp8 else torch.bfloat16), f"prepared rows are {a1q.dtype}")
        self._expect(
            (a1q_scale is not None) == fp8, f"scales {None if a1q_scale is None else a1q_scale.dtype}"
        )
        self._expect(meta is not None and meta.expert_num_tokens is not None, "no expert_num_tokens")
        assert meta is not None and meta.expert_num_tokens is not None
        counts = meta.expert_num_tokens
        self._expect(
            counts.dtype == torch.int32 and counts.device == a1q.device,
            f"counts {counts.dtype} on {counts.device}",
        )
        if self.mode == "ll":
            if a1q_scale is not None:
                groups = a1q.shape[-1] // (512 if self.packed_ue8m0 else 128)
                want = torch.int32 if self.packed_ue8m0 else torch.float32
                self._expect(a1q_scale.shape == (*a1q.shape[:2], groups), f"scales {a1q_scale.shape}")
                self._expect(a1q_scale.dtype == want and a1q_scale.stride(1) == 1, "scales not token-major")
            return batched_experts(self.weights, self.local, a1q, a1q_scale, counts)
        local = expert_map[topk_ids.long()] >= 0
        self._expect(topk_ids.dtype == torch.int64 and topk_ids.shape[0] == a1q.shape[0], "topk_ids")
        self._expect(meta.expert_num_tokens_cpu is not None, "HT: no expert_num_tokens_cpu")
        if meta.expert_num_tokens_cpu is not None:
            pairs = int(meta.expert_num_tokens_cpu.sum())
            self._expect(pairs == int(local.sum()), f"HT counts sum {pairs} != {int(local.sum())}")
        return standard_experts(
            self.weights,
            a1q,
            a1q_scale,
            topk_ids,
            topk_weights,
            expert_map,
            reduce=self.reduce == "noop",
            apply_router_weight_on_input=apply_router_weight_on_input,
        )


def _split(ret: Any) -> tuple[Any, Any]:
    """``(hook, receiver)`` from what an ``*_async`` call returned (a pair, or a receiver alone)."""
    return ret if isinstance(ret, tuple) else (None, ret)


class KernelCalls:
    """``FusedMoEKernel`` over a prepare/finalize and :class:`HarnessExperts`, outside dual-batch
    overlap. ``use_async``: vLLM's path for classes that support it (ncclep's do); otherwise the
    plain ``prepare``/``finalize``."""

    def __init__(self, prepare_finalize: Any, experts: HarnessExperts, use_async: bool = True) -> None:
        self.pf = prepare_finalize
        self.experts = experts
        self.use_async = use_async and prepare_finalize.supports_async()
        prepare_finalize.post_init_setup(experts)
        assert prepare_finalize.activation_format == experts.activation_format()

    def apply(
        self,
        hidden_states: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        global_num_experts: int,
        expert_map: torch.Tensor,
        apply_router_weight_on_input: bool,
    ) -> torch.Tensor:
        output = torch.empty_like(hidden_states)
        args = (
            hidden_states,
            topk_weights,
            topk_ids,
            global_num_experts,
            expert_map,
            apply_router_weight_on_input,
            self.experts.quant_config,
        )
        defer = self.experts.expects_unquantized_inputs
        if self.use_async:
            dbo_maybe_run_recv_hook()
            hook, receiver = _split(self.pf.prepare_async(*args, defer_input_quant=defer))
            if hook is not None:
                hook()
            a1q, a1q_scale, meta, expert_ids, expert_weights = receiver()
        else:
            a1q, a1q_scale, meta, expert_ids, expert_weights = self.pf.prepare(*args, defer_input_quant=defer)
        topk_ids = topk_ids if expert_ids is None else expert_ids
        topk_weights = topk_weights if expert_weights is None else expert_weights

        if a1q.dim() == 2 and a1q.size(0) == 0:
            # FusedMoEKernel skips the experts when no row reached this rank (HT only).
            fused_out = torch.empty_like(a1q, dtype=hidden_states.dtype)
        else:
            fused_out = self.experts.apply(
                a1q, a1q_scale, meta, topk_ids, topk_weights, expert_map, apply_router_weight_on_input
            )

        impl = self.experts.finalize_weight_and_reduce_impl()
        finalize_args = (output, fused_out, topk_weights, topk_ids, apply_router_weight_on_input, impl)
        if self.use_async:
            hook, receiver = _split(self.pf.finalize_async(*finalize_args))
            if hook is not None:
                hook()
            receiver()
        else:
            self.pf.finalize(*finalize_args)
        return output
