"""vLLM prepare/finalize classes over ncclep: LL (batched format) and HT (standard format).

They take the place of ``DeepEPLLPrepareAndFinalize`` and ``DeepEPHTPrepareAndFinalize`` with the
same constructor arguments (``maybe_make_prepare_finalize`` builds them) and the same outputs:

* LL: ``prepare`` gives ``[E_local, T*R, H]`` rows (bf16, or fp8 with per-128-channel scales),
  per-expert counts as int32 on the device, no top-k ids/weights; no host synchronisation, so CUDA
  graphs can capture it. ``finalize`` combines with the top-k weights applied (as DeepEP's LL
  combine does; ncclep takes them from the dispatch, vLLM passes the same tensor to both).
* HT: ``prepare`` gives one row per received token with GLOBAL expert ids (ncclep's local ids plus
  this rank's offset; -1 becomes an expert of another rank, which vLLM's expert map drops), like
  DeepEP HT; like it, it reads the received row count on the host. ``finalize`` applies the top-k
  weights locally, then sums each token's rows back on its rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import vllm.model_executor.layers.fused_moe.modular_kernel as mk
from vllm import envs
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import (
    TopKWeightAndReduceContiguous,
    TopKWeightAndReduceDelegate,
)
from vllm.model_executor.layers.fused_moe.utils import (
    moe_kernel_quantize_input,
    normalize_batched_scales_shape,
)
from vllm.v1.worker.ubatching import dbo_current_ubatch_id, dbo_enabled, dbo_maybe_run_recv_hook

from .. import fp8
from ..group import Group, Pending
from ..handles import HTDispatchOutput, LLDispatchOutput

logger = init_logger("vllm.ncclep")

# ncclep quantises dispatch inputs in blocks of 128 channels, as DeepEP does.
QUANT_BLOCK_SIZE = fp8.BLOCK
QUANT_BLOCK_SHAPE = [QUANT_BLOCK_SIZE, QUANT_BLOCK_SIZE]


def weight_and_reduce(
    fused_expert_output: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    apply_router_weight_on_input: bool,
    impl: mk.TopKWeightAndReduce,
) -> torch.Tensor:
    """``[M, K, H]`` (or ``[M*K, H]``) expert outputs -> ``[M, H]`` weighted sums, as DeepEP HT's finalize.

    Experts that leave the reduction to the prepare/finalize get vLLM's
    ``TopKWeightAndReduceContiguous`` on GPUs (its ``moe_sum`` is a CUDA op) and the same sum in
    PyTorch elsewhere.
    """
    if not isinstance(impl, TopKWeightAndReduceDelegate):
        return impl.apply(
            output=None,
            fused_expert_output=fused_expert_output,
            topk_weights=topk_weights,
            topk_ids=topk_ids,
            apply_router_weight_on_input=apply_router_weight_on_input,
        )
    if fused_expert_output.is_cuda:
        return TopKWeightAndReduceContiguous().apply(
            output=None,
            fused_expert_output=fused_expert_output,
            topk_weights=topk_weights,
            topk_ids=topk_ids,
            apply_router_weight_on_input=apply_router_weight_on_input,
        )
    rows, topk = topk_ids.shape
    values = fused_expert_output.reshape(rows, topk, -1).float()
    if not apply_router_weight_on_input:
        values = values * topk_weights.reshape(rows, topk, 1).float()
    return values.sum(dim=1).to(fused_expert_output.dtype)


class _NcclepPrepareAndFinalize(mk.FusedMoEPrepareAndFinalizeModular):
    """What the LL and HT classes share: the group (vLLM calls it ``buffer``, as DeepEP's), one
    in-flight dispatch per micro-batch, and the answers to vLLM's capability questions."""

    mode: str

    def __init__(self, buffer: Group, num_dispatchers: int) -> None:
        super().__init__()
        if buffer.mode != self.mode:
            raise ValueError(f"{type(self).__name__} needs an {self.mode.upper()} group, got {buffer!r}")
        self.group = buffer
        self.buffer = buffer
        self.num_dispatchers_ = num_dispatchers
        # One dispatch per micro-batch (vLLM's dual-batch overlap runs two).
        self.handles: list[Any] = [None, None]

    def num_dispatchers(self) -> int:
        return self.num_dispatchers_

    def output_is_reduced(self) -> bool:
        return True

    def topk_indices_dtype(self) -> torch.dtype | None:
        return torch.int64

    def supports_async(self) -> bool:
        return True


class NcclepLLPrepareAndFinalize(_NcclepPrepareAndFinalize):
    """Prepare/finalize over ncclep LL (``Group(mode="ll")``); replaces ``DeepEPLLPrepareAndFinalize``."""

    mode = "ll"
    handles: list[Pending[LLDispatchOutput] | None]

    @staticmethod
    def maybe_roundup_layer_hidden_size(hidden_size: int) -> int:
        # ncclep LL takes any hidden size divisible by 128 (the fp8 block), up to the group's.
        return (hidden_size + QUANT_BLOCK_SIZE - 1) // QUANT_BLOCK_SIZE * QUANT_BLOCK_SIZE

    def __init__(
        self,
        buffer: Group,
        max_tokens_per_rank: int,
        num_dispatchers: int,
        use_fp8_dispatch: bool = False,
        global_to_physical: torch.Tensor | None = None,
        physical_to_global: torch.Tensor | None = None,
        local_expert_global_ids: torch.Tensor | None = None,
    ) -> None:
        super().__init__(buffer, num_dispatchers)
        if max_tokens_per_rank > buffer.max_tokens_per_rank:
            raise ValueError(
                f"max_tokens_per_rank={max_tokens_per_rank} exceeds the group's {buffer.max_tokens_per_rank}"
            )
        # The batched rows are sized by the group: [L, R*T, H] with T its max_tokens_per_rank.
        self.max_tokens_per_rank = buffer.max_tokens_per_rank
        self.use_fp8_dispatch = use_fp8_dispatch
        self.use_ue8m0_dispatch = False
        self.global_to_physical = None if global_to_physical is None else global_to_physical.long()
        self.physical_to_global = None if physical_to_global is None else physical_to_global.long()
        self.local_expert_global_ids = (
            None if local_expert_global_ids is None else local_expert_global_ids.long()
        )

    def post_init_setup(self, fused_experts: mk.FusedMoEExperts) -> None:
        if not fused_experts.supports_packed_ue8m0_act_scales():
            return
        if self.use_fp8_dispatch:
            logger.debug_once("ncclep LL: dispatching packed UE8M0 scales.")
            self.use_ue8m0_dispatch = True
        else:
            logger.warning_once(
                "ncclep LL dispatches unquantized activations although "
                f"{fused_experts.__class__.__name__} takes quantized ones."
            )

    @property
    def activation_format(self) -> mk.FusedMoEActivationFormat:
        return mk.FusedMoEActivationFormat.BatchedExperts

    def max_num_tokens_per_rank(self) -> int | None:
        return self.max_tokens_per_rank

    def _map_global_to_physical_ids(self, topk_ids: torch.Tensor) -> torch.Tensor:
        if self.global_to_physical is None:
            return topk_ids
        return self.global_to_physical[topk_ids]

    def prepare_async(
        self,
        a1: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        num_experts: int,
        expert_map: torch.Tensor | None,
        apply_router_weight_on_input: bool,
        quant_config: FusedMoEQuantConfig,
        defer_input_quant: bool = False,
    ) -> tuple[Callable, mk.ReceiverType]:
        if defer_input_quant:
            raise NotImplementedError(
                f"{self.__class__.__name__} does not support defer_input_quant=True. "
                "Please select an MoE kernel that accepts quantized inputs."
            )
        if num_experts != self.group.num_experts:
            raise ValueError(f"num_experts={num_experts} but the ncclep group has {self.group.num_experts}")
        if quant_config.quant_dtype == "nvfp4" and envs.VLLM_DEEPEPLL_NVFP4_DISPATCH:
            raise NotImplementedError("ncclep LL has no nvfp4 dispatch (unset VLLM_DEEPEPLL_NVFP4_DISPATCH)")
        scale = quant_config.a1_scale if quant_config.a1_scale is not None else quant_config.a2_scale
        assert scale is None or scale.numel() == 1, "LL dispatch does not carry per-token scales"

        weights = topk_weights.float()
        if apply_router_weight_on_input:
            assert topk_ids.size(1) == 1, "apply_router_weight_on_input is only implemented for topk=1"
            a1 = a1 * topk_weights.to(a1.dtype)
            weights = torch.ones_like(weights)  # combine must not weight them again

        # ncclep takes contiguous inputs (no copy when they already are; vLLM's may be views).
        pending = self.group.ll_dispatch(
            a1.contiguous(),
            self._map_global_to_physical_ids(topk_ids).contiguous(),
            weights.contiguous(),
            use_fp8=self.use_fp8_dispatch,
            ue8m0=self.use_ue8m0_dispatch,
            send_only=True,
            column_major_scales=self._scales_as_experts_read(quant_config),
        )
        assert isinstance(pending, Pending)
        self.handles[dbo_current_ubatch_id()] = pending
        a1_dtype = a1.dtype

        def hook() -> None:
            pending.wait()

        return hook, lambda: self._receiver(pending.wait(), a1_dtype, quant_config)

    def _receiver(
        self, out: LLDispatchOutput, a1_dtype: torch.dtype, quant_config: FusedMoEQuantConfig
    ) -> mk.PrepareResultType:
        x, x_scales = self._do_quant(out, a1_dtype, quant_config)
        meta = mk.ExpertTokensMetadata(expert_num_tokens=out.expert_counts, expert_num_tokens_cpu=None)
        return x, x_scales, meta, None, None

    def _scales_as_experts_read(self, quant_config: FusedMoEQuantConfig) -> bool:
        """The experts take the dispatch's fp8 rows and scales as they are (blocks of 128 channels):
        the dispatch then writes the scales as DeepEP's LL does, column-major (the batched DeepGEMM
        kernels read them with TMA), packed UE8M0 with ``use_ue8m0_dispatch``."""
        block_k = quant_config.block_shape[1] if quant_config.block_shape is not None else None
        return self.use_fp8_dispatch and block_k == QUANT_BLOCK_SIZE

    def _do_quant(
        self, out: LLDispatchOutput, a1_dtype: torch.dtype, quant_config: FusedMoEQuantConfig
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = out.x
        if self.use_fp8_dispatch:
            assert out.scales is not None
            if self._scales_as_experts_read(quant_config):
                return x, out.scales  # quantised by the dispatch, as the experts want it
            x = fp8.dequantize(x, out.scales).to(a1_dtype)

        q_dtype = quant_config.quant_dtype
        if q_dtype == "nvfp4":
            q_dtype = None  # bf16 dispatch for nvfp4 experts, as DeepEP without nvfp4 dispatch
        num_experts, _, hidden = x.shape
        xq, x_scales = moe_kernel_quantize_input(
            x.view(-1, hidden),
            quant_config.a1_scale,
            q_dtype,
            quant_config.per_act_token_quant,
            quant_config.block_shape,
        )
        xq = xq.view(num_experts, -1, hidden)
        if q_dtype is not None:
            assert x_scales is not None
            x_scales = normalize_batched_scales_shape(x_scales, num_experts)
        return xq, x_scales

    def prepare(
        self,
        a1: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        num_experts: int,
        expert_map: torch.Tensor | None,
        apply_router_weight_on_input: bool,
        quant_config: FusedMoEQuantConfig,
        defer_input_quant: bool = False,
    ) -> mk.PrepareResultType:
        hook, receiver = self.prepare_async(
            a1,
            topk_weights,
            topk_ids,
            num_experts,
            expert_map,
            apply_router_weight_on_input,
            quant_config,
            defer_input_quant,
        )
        hook()
        return receiver()

    def _finalize(
        self,
        output: torch.Tensor,
        fused_expert_output: torch.Tensor,
        weight_and_reduce_impl: mk.TopKWeightAndReduce,
        do_async: bool,
    ) -> tuple[Callable | None, Callable]:
        assert isinstance(weight_and_reduce_impl, TopKWeightAndReduceDelegate), (
            "Weight application and reduction happens in the combine."
        )
        pending = self.handles[dbo_current_ubatch_id()]
        assert pending is not None, "finalize without a prepare"
        handle = pending.wait().handle  # already received by the prepare's receiver
        dbo_maybe_run_recv_hook()
        if dbo_enabled() or do_async:
            combining = self.group.ll_combine(fused_expert_output, handle, out=output, send_only=True)
            assert isinstance(combining, Pending)

            def hook() -> None:
                combining.wait()

            return hook, lambda: None
        self.group.ll_combine(fused_expert_output, handle, out=output)
        return None, lambda: None

    def finalize_async(
        self,
        output: torch.Tensor,
        fused_expert_output: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        apply_router_weight_on_input: bool,
        weight_and_reduce_impl: mk.TopKWeightAndReduce,
    ) -> tuple[Callable, Callable]:
        hook, receiver = self._finalize(output, fused_expert_output, weight_and_reduce_impl, True)
        assert hook is not None
        return hook, receiver

    def finalize(
        self,
        output: torch.Tensor,
        fused_expert_output: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        apply_router_weight_on_input: bool,
        weight_and_reduce_impl: mk.TopKWeightAndReduce,
    ) -> None:
        self._finalize(output, fused_expert_output, weight_and_reduce_impl, False)


class NcclepHTPrepareAndFinalize(_NcclepPrepareAndFinalize):
    """Prepare/finalize over ncclep HT (``Group(mode="ht")``, flat layout); replaces
    ``DeepEPHTPrepareAndFinalize``."""

    mode = "ht"
    handles: list[tuple[Any, torch.Tensor] | None]

    @staticmethod
    def maybe_roundup_layer_hidden_size(hidden_size: int, dtype: torch.dtype) -> int:
        # ncclep HT moves rows of any hidden size divisible by 8.
        return (hidden_size + 7) // 8 * 8

    def __init__(self, buffer: Group, num_dispatchers: int, dp_size: int, rank_expert_offset: int) -> None:
        super().__init__(buffer, num_dispatchers)
        self.dp_size = dp_size
        self.rank_expert_offset = rank_expert_offset

    @property
    def activation_format(self) -> mk.FusedMoEActivationFormat:
        return mk.FusedMoEActivationFormat.Standard

    def max_num_tokens_per_rank(self) -> int | None:
        return None

    def prepare_async(
        self,
        a1: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        num_experts: int,
        expert_map: torch.Tensor | None,
        apply_router_weight_on_input: bool,
        quant_config: FusedMoEQuantConfig,
        defer_input_quant: bool = False,
    ) -> mk.ReceiverType:
        if num_experts != self.group.num_experts:
            raise ValueError(f"num_experts={num_experts} but the ncclep group has {self.group.num_experts}")
        if apply_router_weight_on_input:
            assert topk_ids.size(1) == 1, "apply_router_weight_on_input is only implemented for topk=1"
            a1 = a1 * topk_weights.to(a1.dtype)

        # Block-quantised fp8 is quantised before the dispatch (ncclep carries its scales); every
        # other scheme after it, as with DeepEP HT.
        if quant_config.is_block_quantized and not defer_input_quant:
            a1q, a1q_scale = moe_kernel_quantize_input(
                a1,
                quant_config.a1_scale,
                quant_dtype=quant_config.quant_dtype,
                per_act_token_quant=quant_config.per_act_token_quant,
                block_shape=quant_config.block_shape,
            )
            a1_post_scale = None
        else:
            a1q, a1q_scale = a1, None
            nvfp4 = quant_config.quant_dtype == "nvfp4"
            a1_post_scale = quant_config.a1_gscale if nvfp4 else quant_config.a1_scale

        pending = self.group.ht_dispatch(
            a1q.contiguous(),
            topk_ids.contiguous(),
            topk_weights.float().contiguous(),
            x_scales=None if a1q_scale is None else a1q_scale.contiguous(),
            layout="flat",
            send_only=True,
        )
        assert isinstance(pending, Pending)
        a2a_idx = dbo_current_ubatch_id()
        return lambda: self._receiver(
            pending.wait(), a2a_idx, num_experts, a1_post_scale, quant_config, defer_input_quant
        )

    def _receiver(
        self,
        out: HTDispatchOutput,
        a2a_idx: int,
        num_experts: int,
        a1_scale: torch.Tensor | None,
        quant_config: FusedMoEQuantConfig,
        defer_input_quant: bool,
    ) -> mk.PrepareResultType:
        # Like DeepEP HT, hand the experts exactly the received rows: one host read of the row
        # count and the per-expert counts together.
        n, *expert_counts = torch.cat([out.num_recv, out.expert_counts]).tolist()
        self.handles[a2a_idx] = out.handle
        expert_x = out.x[:n]
        expert_x_scale = None if out.scales is None else out.scales[:n]
        local_ids = out.topk_idx[:n]  # in topk_ids' dtype
        # ncclep gives local ids, -1 where the expert lives elsewhere; vLLM wants global ids and
        # drops other ranks' experts through its expert map (any id of another rank will do).
        elsewhere = num_experts - 1 if self.rank_expert_offset == 0 else 0
        expert_topk_ids = torch.where(local_ids == -1, elsewhere, local_ids + self.rank_expert_offset)
        assert out.topk_weights is not None
        expert_topk_weights = out.topk_weights[:n]
        meta = mk.ExpertTokensMetadata.make_from_list(expert_counts, device=expert_x.device)

        if not quant_config.is_block_quantized and not defer_input_quant:
            expert_x_scale = None
            if expert_x.numel() != 0:
                expert_x, expert_x_scale = moe_kernel_quantize_input(
                    expert_x,
                    a1_scale,
                    quant_dtype=quant_config.quant_dtype,
                    per_act_token_quant=False,
                    block_shape=quant_config.block_shape,
                    is_scale_swizzled=quant_config.is_scale_swizzled,
                )
        return expert_x, expert_x_scale, meta, expert_topk_ids, expert_topk_weights

    def prepare(
        self,
        a1: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        num_experts: int,
        expert_map: torch.Tensor | None,
        apply_router_weight_on_input: bool,
        quant_config: FusedMoEQuantConfig,
        defer_input_quant: bool = False,
    ) -> mk.PrepareResultType:
        receiver = self.prepare_async(
            a1,
            topk_weights,
            topk_ids,
            num_experts,
            expert_map,
            apply_router_weight_on_input,
            quant_config,
            defer_input_quant,
        )
        return receiver()

    def _finalize(
        self,
        output: torch.Tensor,
        fused_expert_output: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        apply_router_weight_on_input: bool,
        weight_and_reduce_impl: mk.TopKWeightAndReduce,
        do_async: bool,
    ) -> Callable | None:
        handle = self.handles[dbo_current_ubatch_id()]
        assert handle is not None, "finalize without a prepare"
        # Experts may leave [n, K, H] unreduced or [n, H]; with no rows here there is nothing to do.
        if fused_expert_output.numel() != 0:
            fused_expert_output = weight_and_reduce(
                fused_expert_output,
                topk_weights,
                topk_ids,
                apply_router_weight_on_input,
                weight_and_reduce_impl,
            )
        hidden = output.shape[-1]
        # ncclep's combine takes the dispatch's first n rows alone (the rows past them hold no
        # token): no copy into its worst-case [N, H].
        if fused_expert_output.numel() != 0:
            rows = fused_expert_output.reshape(-1, hidden).to(torch.bfloat16).contiguous()
        else:
            rows = torch.empty((0, hidden), dtype=torch.bfloat16, device=output.device)
        combining = self.group.ht_combine(rows, handle, send_only=do_async)
        if do_async:
            assert isinstance(combining, Pending)

            def receiver() -> None:
                output.copy_(combining.wait()[0])

            return receiver
        assert not isinstance(combining, Pending)
        output.copy_(combining[0])
        return None

    def finalize_async(
        self,
        output: torch.Tensor,
        fused_expert_output: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        apply_router_weight_on_input: bool,
        weight_and_reduce_impl: mk.TopKWeightAndReduce,
    ) -> Callable:
        receiver = self._finalize(
            output,
            fused_expert_output,
            topk_weights,
            topk_ids,
            apply_router_weight_on_input,
            weight_and_reduce_impl,
            True,
        )
        assert receiver is not None
        return receiver

    def finalize(
        self,
        output: torch.Tensor,
        fused_expert_output: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        apply_router_weight_on_input: bool,
        weight_and_reduce_impl: mk.TopKWeightAndReduce,
    ) -> None:
        self._finalize(
            output,
            fused_expert_output,
            topk_weights,
            topk_ids,
            apply_router_weight_on_input,
            weight_and_reduce_impl,
            False,
        )
