"""``ncclep.deep_ep``: DeepEP V1's Python API (``deep_ep.Buffer`` and friends) on ncclep.

Code written against DeepEP V1 runs on ncclep by importing this module in place of ``deep_ep``::

    from ncclep import deep_ep
    buffer = deep_ep.Buffer(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode=True)

or, unmodified, through the ``deep_ep`` alias package and ``NCCLEP_DEEP_EP=1`` (``docs/deep_ep.md``).
Shapes, dtypes and layouts are DeepEP's; the differences in meaning are listed in the docs.
"""

from __future__ import annotations

import torch

from . import utils
from .buffer import Buffer
from .config import Config
from .handles import DispatchHandle, LowLatencyHandle
from .utils import EventHandle, EventOverlap

topk_idx_t = torch.int64
"""The dtype of top-k expert indices (DeepEP's ``deep_ep.topk_idx_t``); int32 is accepted too."""

__all__ = [
    "Buffer",
    "Config",
    "DispatchHandle",
    "EventHandle",
    "EventOverlap",
    "LowLatencyHandle",
    "topk_idx_t",
    "utils",
]
