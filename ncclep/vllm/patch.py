"""The swap: vLLM has no registry for all2all backends, so ncclep replaces the classes it looks up.

vLLM picks its all2all manager in ``CudaCommunicator.__init__`` by an if/elif chain on the backend
name (a fixed ``Literal``), importing the class from ``vllm.distributed.device_communicators.all2all``
when it needs it, and its prepare/finalize class in
``vllm.model_executor.layers.fused_moe.all2all_utils.maybe_make_prepare_finalize``, which reads
module globals at call time. Replacing those module attributes is enough:

=============================================================  ===================================
vLLM symbol                                                    becomes
=============================================================  ===================================
``device_communicators.all2all.DeepEPLLAll2AllManager``        :class:`NcclepLLAll2AllManager`
``device_communicators.all2all.DeepEPHTAll2AllManager``        :class:`NcclepHTAll2AllManager`
``fused_moe.all2all_utils.DeepEPLLPrepareAndFinalize``         :class:`NcclepLLPrepareAndFinalize`
``fused_moe.all2all_utils.DeepEPHTPrepareAndFinalize``         :class:`NcclepHTPrepareAndFinalize`
``fused_moe.all2all_utils.DEEPEP_QUANT_BLOCK_SHAPE``           ``[128, 128]`` (ncclep's fp8 block)
=============================================================  ===================================

So ``--all2all-backend deepep_low_latency`` runs ncclep LL and ``deepep_high_throughput`` ncclep
HT; DeepEP itself need not be installed.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

ALL2ALL_MODULE = "vllm.distributed.device_communicators.all2all"
UTILS_MODULE = "vllm.model_executor.layers.fused_moe.all2all_utils"

logger = logging.getLogger("ncclep.vllm")
_originals: dict[tuple[str, str], Any] = {}
_MISSING = object()


def replacements() -> dict[tuple[str, str], Any]:
    """``{(module, attribute): ncclep object}`` for every vLLM symbol the plugin replaces."""
    from .all2all import NcclepHTAll2AllManager, NcclepLLAll2AllManager
    from .prepare_finalize import QUANT_BLOCK_SHAPE, NcclepHTPrepareAndFinalize, NcclepLLPrepareAndFinalize

    return {
        (ALL2ALL_MODULE, "DeepEPLLAll2AllManager"): NcclepLLAll2AllManager,
        (ALL2ALL_MODULE, "DeepEPHTAll2AllManager"): NcclepHTAll2AllManager,
        (UTILS_MODULE, "DeepEPLLPrepareAndFinalize"): NcclepLLPrepareAndFinalize,
        (UTILS_MODULE, "DeepEPHTPrepareAndFinalize"): NcclepHTPrepareAndFinalize,
        (UTILS_MODULE, "DEEPEP_QUANT_BLOCK_SHAPE"): list(QUANT_BLOCK_SHAPE),
    }


def is_applied() -> bool:
    return bool(_originals)


def apply() -> None:
    """Replace vLLM's DeepEP classes with ncclep's (idempotent) and say so in the log."""
    if _originals:
        return
    for (module_name, attr), new in replacements().items():
        module = importlib.import_module(module_name)
        _originals[(module_name, attr)] = getattr(module, attr, _MISSING)
        setattr(module, attr, new)
    from vllm.logger import init_logger

    init_logger("vllm.ncclep").info(
        "ncclep plugin (VLLM_NCCLEP=1): all2all backend 'deepep_low_latency' now runs ncclep LL "
        "(NcclepLLAll2AllManager, NcclepLLPrepareAndFinalize) and 'deepep_high_throughput' runs "
        "ncclep HT (NcclepHTAll2AllManager, NcclepHTPrepareAndFinalize)"
    )


def undo() -> None:
    """Put vLLM's own objects back (tests)."""
    for (module_name, attr), old in _originals.items():
        module = importlib.import_module(module_name)
        if old is _MISSING:
            delattr(module, attr)
        else:
            setattr(module, attr, old)
    _originals.clear()
