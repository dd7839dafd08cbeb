"""``deep_ep``: DeepEP V1's API on ncclep (:mod:`ncclep.deep_ep`), when ``NCCLEP_DEEP_EP=1``.

This is ncclep's alias package, not DeepEP. Without the switch importing it raises
``ImportError``, as where DeepEP is not installed.
"""

from ncclep.deep_ep.switch import require_enabled

require_enabled()

from ncclep.deep_ep import Buffer, Config, EventHandle, EventOverlap, topk_idx_t  # noqa: E402

from . import buffer, utils  # noqa: E402

__all__ = ["Buffer", "Config", "EventHandle", "EventOverlap", "buffer", "topk_idx_t", "utils"]
