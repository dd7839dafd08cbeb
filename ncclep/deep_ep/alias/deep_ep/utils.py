"""``deep_ep.utils``: DeepEP's event helpers, from :mod:`ncclep.deep_ep.utils`."""

from ncclep.deep_ep.utils import EventHandle, EventOverlap

__all__ = ["EventHandle", "EventOverlap"]
