"""Stand-ins for the vLLM names that ncclep's vLLM classes import, for hosts without vLLM (the GPU hosts).

:func:`ensure_vllm` imports vLLM where it is installed and changes nothing. Elsewhere it puts small
modules into ``sys.modules`` under vLLM's names and logs :data:`NOTICE`: "vLLM is not installed:
its classes are replaced by stand-ins that make the same calls".

What is stood in: exactly what ``ncclep/vllm/prepare_finalize.py`` and ``ncclep/vllm/all2all.py``
import, plus ``TopKWeightAndReduceNoOP`` (what experts that reduce themselves hand the finalize).
Each one behaves as vLLM 0.32's does on the paths those classes take: unquantised and fp8
``[128, 128]`` block (per-token-group) activation quantisation, the top-k weight-and-reduce
variants, the batched scale shapes, the expert-count metadata, and the dual-batch-overlap hooks
as they are outside a micro-batch (vLLM without ``--enable-dbo``). Everything else raises
``NotImplementedError``. The classes under test (ncclep's) are never stood in.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from types import ModuleType
from typing import Any

import torch

NOTICE = "vLLM is not installed: its classes are replaced by stand-ins that make the same calls"
_MARK = "__ncclep_stand_in__"
# vLLM's fp8 on CUDA (current_platform.fp8_dtype()); ROCm's e4m3fnuz is not stood in.
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
GROUP_QUANT_EPS = 1e-10  # per_token_group_quant_fp8's default

logger = logging.getLogger("ncclep.vllm_harness")


# ------------------------------------------------------------------------------ vllm.logger


class _Logger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """``logging.Logger`` plus vLLM's ``*_once`` methods (vLLM patches them onto its loggers)."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.getLogger(name), {})
        self._seen: set[tuple[int, str]] = set()

    def _once(self, level: int, msg: str, *args: Any) -> None:
        if (level, msg) not in self._seen:
            self._seen.add((level, msg))
            self.log(level, msg, *args)

    def debug_once(self, msg: str, *args: Any, scope: str = "local") -> None:
        self._once(logging.DEBUG, msg, *args)

    def info_once(self, msg: str, *args: Any, scope: str = "local") -> None:
        self._once(logging.INFO, msg, *args)

    def warning_once(self, msg: str, *args: Any, scope: str = "local") -> None:
        self._once(logging.WARNING, msg, *args)


def init_logger(name: str) -> _Logger:
    return _Logger(name)


# -------------------------------------------------------------------------------- vllm.envs


def _envs_getattr(name: str) -> Any:
    # vLLM's envs module reads each variable when it is asked for.
    if name == "VLLM_DEEPEPLL_NVFP4_DISPATCH":
        return bool(int(os.getenv(name, "0")))
    raise AttributeError(f"vllm.envs stand-in has no {name!r}")


# --------------------------------------------------------------------- fused_moe.config


@dataclass(frozen=True)
class FusedMoEQuantConfig:
    """The activation-side fields of vLLM's quant config that the prepare/finalize classes read."""

    quant_dtype: torch.dtype | str | None = None
    per_act_token_quant: bool = False
    block_shape: list[int] | None = None
    a1_scale: torch.Tensor | None = None
    a2_scale: torch.Tensor | None = None
    a1_gscale: torch.Tensor | None = None
    is_scale_swizzled: bool = True

    @property
    def is_block_quantized(self) -> bool:
        return self.block_shape is not None

    @staticmethod
    def make(
        quant_dtype: torch.dtype | str | None = None,
        per_act_token_quant: bool = False,
        block_shape: list[int] | None = None,
        a1_scale: torch.Tensor | None = None,
        a2_scale: torch.Tensor | None = None,
        a1_gscale: torch.Tensor | None = None,
        is_scale_swizzled: bool = True,
    ) -> FusedMoEQuantConfig:
        """vLLM's builder, for the arguments above (it also takes the weights' quantisation)."""
        if block_shape is not None and per_act_token_quant:
            raise ValueError("block_shape and per_act_token_quant exclude each other")
        return FusedMoEQuantConfig(
            quant_dtype, per_act_token_quant, block_shape, a1_scale, a2_scale, a1_gscale, is_scale_swizzled
        )


# ----------------------------------------------------------------- fused_moe.modular_kernel


class FusedMoEActivationFormat(Enum):
    Standard = ("standard",)
    BatchedExperts = ("batched_experts",)


@dataclass
class ExpertTokensMetadata:
    expert_num_tokens: torch.Tensor | None
    expert_num_tokens_cpu: torch.Tensor | None
    psum_recv_per_rank: torch.Tensor | None = None

    @staticmethod
    def make_from_list(expert_num_tokens_list: list[int], device: Any) -> ExpertTokensMetadata:
        cpu = torch.tensor(expert_num_tokens_list, dtype=torch.int32)
        return ExpertTokensMetadata(expert_num_tokens=cpu.to(device), expert_num_tokens_cpu=cpu)


class TopKWeightAndReduce(ABC):
    @abstractmethod
    def apply(
        self,
        output: torch.Tensor | None,
        fused_expert_output: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        apply_router_weight_on_input: bool,
    ) -> torch.Tensor: ...


PrepareResultType = tuple[
    torch.Tensor,
    torch.Tensor | None,
    ExpertTokensMetadata | None,
    torch.Tensor | None,
    torch.Tensor | None,
]
ReceiverType = Callable[[], PrepareResultType]


class FusedMoEPrepareAndFinalizeModular(ABC):
    """vLLM's base class: the same abstract methods, so an incomplete subclass fails as it would there."""

    def post_init_setup(self, fused_experts: Any) -> None:  # noqa: B027 (a no-op hook, as in vLLM)
        pass

    @property
    @abstractmethod
    def activation_format(self) -> FusedMoEActivationFormat: ...

    @abstractmethod
    def topk_indices_dtype(self) -> torch.dtype | None: ...

    @abstractmethod
    def max_num_tokens_per_rank(self) -> int | None: ...

    @abstractmethod
    def num_dispatchers(self) -> int: ...

    @abstractmethod
    def output_is_reduced(self) -> bool: ...

    def supports_async(self) -> bool:
        return False

    @abstractmethod
    def prepare(self, *args: Any, **kwargs: Any) -> PrepareResultType: ...

    def prepare_async(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    @abstractmethod
    def finalize(self, *args: Any, **kwargs: Any) -> None: ...

    def finalize_async(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


class FusedMoEExperts:
    """Named in annotations only; the harness's experts answer the same question by duck typing."""

    def supports_packed_ue8m0_act_scales(self) -> bool:
        return False


# ------------------------------------------------------------ fused_moe.topk_weight_and_reduce


class TopKWeightAndReduceDelegate(TopKWeightAndReduce):
    """The experts leave weighting and reduction to the prepare/finalize; applying it is an error."""

    def apply(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError(
            "The caller is expected to choose an appropriate TopKWeightAndReduce implementation."
        )


class TopKWeightAndReduceNoOP(TopKWeightAndReduce):
    """The experts already weighted and reduced: pass the output through (copy into ``output`` if given)."""

    def apply(
        self,
        output: torch.Tensor | None,
        fused_expert_output: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        apply_router_weight_on_input: bool,
    ) -> torch.Tensor:
        if output is None:
            return fused_expert_output
        if output is not fused_expert_output:
            assert output.size() == fused_expert_output.size()
            output.copy_(fused_expert_output)
        return output


class TopKWeightAndReduceContiguous(TopKWeightAndReduce):
    """``[m, topk, k]`` (or ``[m*topk, k]``): weights multiplied in place, then vLLM's ``moe_sum``
    over top-k (``at::sum_out``, here ``torch.sum``) into ``output`` ``[m, k]`` of the same dtype."""

    def apply(
        self,
        output: torch.Tensor | None,
        fused_expert_output: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        apply_router_weight_on_input: bool,
    ) -> torch.Tensor:
        m, topk = topk_ids.size()
        k = fused_expert_output.size(-1)
        values = fused_expert_output.view(m, topk, k)
        if not apply_router_weight_on_input:
            values.mul_(topk_weights.view(m, -1, 1))
        if output is None:
            output = torch.empty((m, k), device=values.device, dtype=values.dtype)
        assert output.size() == (m, k)
        torch.sum(values, dim=1, out=output)
        return output


# ---------------------------------------------------------------------------- fused_moe.utils


def _per_token_group_quant_fp8(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's ``per_token_group_quant_fp8`` with its defaults (row-major fp32 scales, no UE8M0, which
    vLLM uses only with DeepGEMM's E8M0 kernels): ``scale = max(amax, eps) / fp8_max`` per group,
    ``q = clamp(x / scale)``."""
    if x.shape[-1] % group_size:
        raise ValueError(f"the last dimension {x.shape[-1]} must be divisible by {group_size}")
    groups = x.float().reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    scales = groups.abs().amax(dim=-1).clamp_min(GROUP_QUANT_EPS) / FP8_MAX
    q = (groups / scales.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.reshape(x.shape), scales


def moe_kernel_quantize_input(
    A: torch.Tensor,
    A_scale: torch.Tensor | None,
    quant_dtype: torch.dtype | str | None,
    per_act_token_quant: bool,
    block_shape: list[int] | None = None,
    is_scale_swizzled: bool = True,
    quantization_emulation: bool = False,
    mx_alignment: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unquantised: ``(A, A_scale)`` untouched. fp8 with a block shape: per-token-group quantisation
    over ``block_shape[1]`` channels (``A_scale`` is not used, as in vLLM)."""
    if quant_dtype == FP8_DTYPE:
        if quantization_emulation or block_shape is None or per_act_token_quant:
            raise NotImplementedError(
                "stand-in moe_kernel_quantize_input: fp8 only with a block shape (per-token-group)"
            )
        return _per_token_group_quant_fp8(A, block_shape[1])
    if isinstance(quant_dtype, str) or quant_dtype == torch.int8:
        raise NotImplementedError(f"stand-in moe_kernel_quantize_input: no {quant_dtype} quantisation")
    return A, A_scale


def normalize_batched_scales_shape(scales: torch.Tensor | None, num_experts: int) -> torch.Tensor | None:
    """Per-expert scales ``[E, rows, groups]``; one scalar is repeated for every expert."""
    if scales is None or scales.ndim >= 3:
        return scales
    if scales.numel() == 1:
        return scales.view(1).repeat_interleave(num_experts).view(num_experts, 1, 1)
    return scales.view(num_experts, -1, scales.size(-1))


# ---------------------------------------------------------------------- v1.worker.ubatching
# Outside a micro-batch context (no --enable-dbo) vLLM's functions answer exactly this.


def dbo_enabled() -> bool:
    return False


def dbo_current_ubatch_id() -> int:
    return 0


def dbo_maybe_run_recv_hook() -> None:
    return None


# ---------------------------------------------------- distributed...base_device_communicator


class All2AllManagerBase:
    """Base of ncclep's managers; the harness builds them with ``for_process_group``, which does not
    call this constructor (vLLM's needs its parallel state)."""

    def __init__(self, cpu_group: Any, tcp_store_group: Any = None) -> None:
        raise NotImplementedError("the vLLM stand-in has no parallel state: use for_process_group()")


# ---------------------------------------------------------------------------- installation

_FUSED_MOE = "vllm.model_executor.layers.fused_moe"
_CONTENTS: dict[str, dict[str, Any]] = {
    "vllm": {},
    "vllm.envs": {"__getattr__": _envs_getattr},
    "vllm.logger": {"init_logger": init_logger},
    "vllm.model_executor": {},
    "vllm.model_executor.layers": {},
    _FUSED_MOE: {},
    f"{_FUSED_MOE}.config": {"FusedMoEQuantConfig": FusedMoEQuantConfig},
    f"{_FUSED_MOE}.modular_kernel": {
        "FusedMoEActivationFormat": FusedMoEActivationFormat,
        "ExpertTokensMetadata": ExpertTokensMetadata,
        "TopKWeightAndReduce": TopKWeightAndReduce,
        "PrepareResultType": PrepareResultType,
        "ReceiverType": ReceiverType,
        "FusedMoEPrepareAndFinalizeModular": FusedMoEPrepareAndFinalizeModular,
        "FusedMoEExperts": FusedMoEExperts,
    },
    f"{_FUSED_MOE}.topk_weight_and_reduce": {
        "TopKWeightAndReduceDelegate": TopKWeightAndReduceDelegate,
        "TopKWeightAndReduceNoOP": TopKWeightAndReduceNoOP,
        "TopKWeightAndReduceContiguous": TopKWeightAndReduceContiguous,
    },
    f"{_FUSED_MOE}.utils": {
        "moe_kernel_quantize_input": moe_kernel_quantize_input,
        "normalize_batched_scales_shape": normalize_batched_scales_shape,
    },
    "vllm.v1": {},
    "vllm.v1.worker": {},
    "vllm.v1.worker.ubatching": {
        "dbo_enabled": dbo_enabled,
        "dbo_current_ubatch_id": dbo_current_ubatch_id,
        "dbo_maybe_run_recv_hook": dbo_maybe_run_recv_hook,
    },
    "vllm.distributed": {},
    "vllm.distributed.device_communicators": {},
    "vllm.distributed.device_communicators.base_device_communicator": {
        "All2AllManagerBase": All2AllManagerBase
    },
}


def build_modules() -> dict[str, ModuleType]:
    """The stand-in modules by name, each set as an attribute of its parent (not installed)."""
    modules: dict[str, ModuleType] = {}
    for name, contents in _CONTENTS.items():
        module = ModuleType(name, f"ncclep test stand-in for {name}")
        module.__dict__.update(contents)
        setattr(module, _MARK, True)
        if any(other.startswith(name + ".") for other in _CONTENTS):
            module.__path__ = []  # a package, so that its submodules import
        modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    return modules


def using_stand_ins() -> bool:
    return bool(getattr(sys.modules.get("vllm"), _MARK, False))


def real_vllm_installed() -> bool:
    """Whether a real vLLM package is importable (not the stand-ins, nor a namespace package such
    as this repository's ``tests/vllm`` folder where ``tests/`` is on ``sys.path``)."""
    loaded = sys.modules.get("vllm")
    if loaded is not None:
        return not getattr(loaded, _MARK, False) and getattr(loaded, "__file__", None) is not None
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


def ensure_vllm() -> str:
    """Make the vLLM names importable: ``"vllm"`` when vLLM is installed (untouched), else install the
    stand-ins (once per process; they stay) and return ``"stand-ins"``."""
    if using_stand_ins():
        return "stand-ins"
    if real_vllm_installed():
        return "vllm"
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        del sys.modules[name]  # a namespace package that is not vLLM
    sys.modules.update(build_modules())
    logger.warning(NOTICE)
    return "stand-ins"
