"""The ``NCCLEP_*`` environment variables the Python package reads, each parsed here only.

(The C library reads ``NCCLEP_VIRTUAL_NODES`` itself for C programs; Python passes its value
explicitly, so both see the same number. The HT send-block knobs are read by the C library alone.)
"""

from __future__ import annotations

import os

from .errors import InvalidArgument

VIRTUAL_NODES = "NCCLEP_VIRTUAL_NODES"


def virtual_nodes() -> int:
    """How many virtual nodes each NVLink host is split into (1: off)."""
    value = os.environ.get(VIRTUAL_NODES, "1")
    try:
        nodes = int(value)
    except ValueError:
        raise InvalidArgument(f"{VIRTUAL_NODES} must be an integer, got {value!r}", reason="option") from None
    if nodes < 1:
        raise InvalidArgument(f"{VIRTUAL_NODES} must be at least 1, got {nodes}", reason="option")
    return nodes
