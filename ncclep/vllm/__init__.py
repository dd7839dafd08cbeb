"""vLLM plugin: ncclep behind vLLM's ``deepep_low_latency`` and ``deepep_high_throughput`` backends.

Installed with ``pip install -e .[vllm]`` and registered as the ``vllm.general_plugins`` entry point
``ncclep``; vLLM calls :func:`register` in every process it starts. Nothing happens unless
``VLLM_NCCLEP=1``. Then the classes vLLM looks up by name for those two all2all backends are
replaced (see :mod:`ncclep.vllm.patch`), so ``--all2all-backend deepep_low_latency`` runs ncclep LL
and ``deepep_high_throughput`` runs ncclep HT. The submodules import vLLM; this one does not.
"""

from __future__ import annotations

import os

ENV_FLAG = "VLLM_NCCLEP"


def enabled() -> bool:
    """Whether ``VLLM_NCCLEP`` asks for the plugin (``1``, ``true``, ``yes`` or ``on``)."""
    return os.environ.get(ENV_FLAG, "0").strip().lower() in ("1", "true", "yes", "on")


def register() -> bool:
    """The entry point: swap vLLM's DeepEP classes for ncclep's when ``VLLM_NCCLEP=1``.

    Returns whether the classes were swapped. Safe to call several times.
    """
    if not enabled():
        return False
    from .patch import apply

    apply()
    return True


__all__ = ["ENV_FLAG", "enabled", "register"]
