"""The switch that lets ``import deep_ep`` resolve to :mod:`ncclep.deep_ep`: ``NCCLEP_DEEP_EP=1``.

The mechanism is a plain package: the ``ncclep-deep-ep-alias`` distribution (source in
``ncclep/deep_ep/alias``) installs a top-level ``deep_ep`` package whose modules re-export
:mod:`ncclep.deep_ep` when the switch is on, and raise ``ImportError`` when it is off, so that
``import deep_ep`` fails exactly as it does where DeepEP is not installed. No import hooks, no
``.pth`` file, no ``sitecustomize``: every process that can import the package (workers spawned by
torchrun, multiprocessing or vLLM included) sees the same switch through its environment.
"""

from __future__ import annotations

import os

ENV_FLAG = "NCCLEP_DEEP_EP"
ON = ("1", "true", "yes", "on")


def enabled() -> bool:
    """Whether ``NCCLEP_DEEP_EP`` is set to ``1`` (or ``true``, ``yes``, ``on``)."""
    return os.environ.get(ENV_FLAG, "").strip().lower() in ON


def require_enabled() -> None:
    """Raise ``ImportError`` unless the switch is on: what the alias package does first."""
    if not enabled():
        raise ImportError(
            "deep_ep here is ncclep's alias (the ncclep-deep-ep-alias distribution) and it is switched off: "
            f"set {ENV_FLAG}=1 to run DeepEP V1 code on ncclep, or install DeepEP itself"
        )
