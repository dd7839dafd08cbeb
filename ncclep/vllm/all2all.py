"""All2all managers for vLLM: they hand out ncclep groups where vLLM's DeepEP managers hand out buffers.

vLLM builds one manager per EP group (``CudaCommunicator``, when ``--data-parallel-size > 1`` and
``--enable-expert-parallel``) and asks it for a handle once per MoE layer configuration through
``get_handle(kwargs)``; both managers cache one :class:`ncclep.Group` per configuration.

* LL: ``kwargs`` holds ``max_num_tokens_per_dp_rank, token_hidden_size, num_ep_ranks,
  num_global_experts, num_local_experts`` -> ``Group(mode="ll")``.
* HT: ``kwargs`` is empty; the sizes come from the current vLLM config (experts, top-k and hidden
  size of the model, ``max_num_batched_tokens``) -> ``Group(mode="ht")``.

The group runs over the EP group's device group (NCCL on GPUs, so the CUDA backend is chosen as
usual; gloo on CPU, where the reference backend runs).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch.distributed as dist
from vllm.distributed.device_communicators.base_device_communicator import All2AllManagerBase
from vllm.logger import init_logger

from .. import _native
from ..group import Group

logger = init_logger("vllm.ncclep")

ENV_BACKEND = "NCCLEP_VLLM_BACKEND"  # auto (default), reference or cuda
ENV_MAX_TOPK = "NCCLEP_VLLM_MAX_TOPK"  # LL: the largest top-k (vLLM does not pass it)
# Without it: the LL kernels' largest top-k (the C library's), or this on a pure-Python install.
DEFAULT_MAX_TOPK = 16


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


class _NcclepAll2AllManager(All2AllManagerBase):
    """What both managers share: the group cache, the process group, ``destroy``."""

    mode = ""

    def __init__(self, cpu_group: Any, tcp_store_group: Any = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(cpu_group, tcp_store_group)
        self._setup()

    def _setup(self, process_group: Any = None) -> None:
        self.handle_cache: dict[tuple[Any, ...], Group] = {}
        self._cache_lock = threading.Lock()
        self._process_group = process_group
        self.num_sms: int | None = None

    @classmethod
    def for_process_group(cls, process_group: Any = None, dp_world_size: int | None = None) -> Any:
        """A manager over ``process_group`` (default WORLD) without vLLM's parallel state.

        For tests and for using the prepare/finalize classes outside a vLLM engine: vLLM's own
        constructor needs its DP/TP groups to exist.
        """
        self = cls.__new__(cls)
        pg = process_group if process_group is not None else dist.group.WORLD
        self.cpu_group = pg
        self.tcp_store_group = None
        self.rank = dist.get_rank(pg)
        self.world_size = dist.get_world_size(pg)
        self.dp_rank = self.rank
        self.dp_world_size = self.world_size if dp_world_size is None else dp_world_size
        self.dp_group = self.tp_group = None
        self.internode = False
        self.support_fault_tolerance = False
        self._setup(pg)
        return self

    def process_group(self) -> Any:
        """The group ncclep runs over: the EP device group (NCCL on GPUs), else the CPU group."""
        if self._process_group is not None:
            return self._process_group
        try:
            from vllm.distributed import get_ep_group

            return get_ep_group().device_group
        except (AssertionError, ImportError, AttributeError):
            return self.cpu_group

    def _cached_group(self, key: tuple[Any, ...], **sizes: Any) -> Group:
        with self._cache_lock:
            group = self.handle_cache.get(key)
            if group is None or group.closed:
                backend = os.environ.get(ENV_BACKEND, "auto")
                group = Group(mode=self.mode, process_group=self.process_group(), backend=backend, **sizes)
                logger.info("ncclep: %r for vLLM (%s)", group, type(self).__name__)
                self.handle_cache[key] = group
            return group

    def get_handle(self, kwargs: dict[str, Any]) -> Group:
        raise NotImplementedError

    def set_num_sms(self, num_sms: int) -> None:
        # Called by vLLM's dual-batch overlap. ncclep sizes its SMs when a group is made
        # (Group(num_sms=...)); later groups of this manager use this value.
        self.num_sms = num_sms

    def max_sms_used(self) -> int | None:
        return None

    def dispatch(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("ncclep dispatches through its prepare/finalize classes")

    def combine(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("ncclep combines through its prepare/finalize classes")

    def destroy(self) -> None:
        with self._cache_lock:
            for group in self.handle_cache.values():
                group.close()
            self.handle_cache.clear()


class NcclepLLAll2AllManager(_NcclepAll2AllManager):
    """Stands in for ``DeepEPLLAll2AllManager``: one ``Group(mode="ll")`` per layer configuration."""

    mode = "ll"

    def get_handle(self, kwargs: dict[str, Any]) -> Group:
        max_tokens = int(kwargs["max_num_tokens_per_dp_rank"])
        hidden = int(kwargs["token_hidden_size"])
        num_experts = int(kwargs["num_global_experts"])
        num_ranks = int(kwargs["num_ep_ranks"])
        if num_ranks != self.world_size:
            raise ValueError(f"num_ep_ranks={num_ranks} but the EP group has {self.world_size} ranks")
        if "num_local_experts" in kwargs and int(kwargs["num_local_experts"]) * num_ranks != num_experts:
            raise ValueError(
                f"ncclep needs num_global_experts ({num_experts}) = num_local_experts "
                f"({kwargs['num_local_experts']}) x num_ep_ranks ({num_ranks})"
            )
        default_topk = min(_native.limits().get("ll_max_topk", DEFAULT_MAX_TOPK), num_experts)
        max_topk = _env_int(ENV_MAX_TOPK, default_topk)
        key = (max_tokens, hidden, num_experts, max_topk, self.num_sms)
        return self._cached_group(
            key,
            num_experts=num_experts,
            max_tokens_per_rank=max_tokens,
            hidden=hidden,
            max_topk=max_topk,
            num_sms=self.num_sms,
        )


def ht_sizes_from_vllm_config() -> dict[str, int]:
    """``num_experts, max_tokens_per_rank, hidden, max_topk`` of an HT group, from the current vLLM config.

    Physical experts (logical plus EPLB's redundant ones), the model's top-k, its hidden size
    rounded up as :meth:`NcclepHTPrepareAndFinalize.maybe_roundup_layer_hidden_size` does, and
    ``max_num_batched_tokens`` (the most tokens one DP rank runs in a step).
    """
    from vllm.config import get_current_vllm_config

    cfg = get_current_vllm_config()
    model = cfg.model_config
    if model is None:
        raise ValueError("ncclep HT needs the model config to size its group (no current vLLM config)")
    num_experts = int(model.get_num_experts())
    if num_experts <= 0:
        raise ValueError(f"ncclep HT: the model config reports {num_experts} experts")
    parallel = cfg.parallel_config
    if getattr(parallel, "enable_eplb", False):
        num_experts += int(parallel.eplb_config.num_redundant_experts)
    return dict(
        num_experts=num_experts,
        max_tokens_per_rank=int(cfg.scheduler_config.max_num_batched_tokens),
        hidden=_round_up(int(model.get_hidden_size()), 8),
        max_topk=int(model.get_num_experts_per_tok()),
    )


class NcclepHTAll2AllManager(_NcclepAll2AllManager):
    """Stands in for ``DeepEPHTAll2AllManager``: one ``Group(mode="ht")`` sized from the vLLM config.

    vLLM passes no arguments; outside an engine the sizes can be given as ``num_experts,
    max_tokens_per_rank, hidden, max_topk``.
    """

    mode = "ht"

    def get_handle(self, kwargs: dict[str, Any]) -> Group:
        sizes = dict(kwargs) if kwargs else ht_sizes_from_vllm_config()
        key = (*sorted(sizes.items()), self.num_sms)
        return self._cached_group(key, num_sms=self.num_sms, **sizes)
