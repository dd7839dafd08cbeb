"""``deep_ep.buffer``: the ``Buffer`` class, from :mod:`ncclep.deep_ep.buffer`."""

from ncclep.deep_ep.buffer import Buffer
from ncclep.deep_ep.config import Config
from ncclep.deep_ep.utils import EventOverlap

__all__ = ["Buffer", "Config", "EventOverlap"]
