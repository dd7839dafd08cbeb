"""Exceptions raised by ncclep. ``except ncclep.NcclepError`` catches every one of them."""

from __future__ import annotations


class NcclepError(Exception):
    """Base class of ncclep's own errors."""


class InvalidArgument(NcclepError, ValueError):
    """An argument broke the API contract; nothing was launched and the group stays usable."""


class CommError(NcclepError, RuntimeError):
    """A device-side wait expired or a peer reported a failure.

    ``phase`` names the protocol step that was waiting, ``rank`` the rank that saw it and
    ``peer`` the rank it was waiting for (-1 when unknown). The group that raised it can only be
    closed; open a new :class:`ncclep.Group` to go on.
    """

    def __init__(self, message: str, *, phase: str = "", rank: int = -1, peer: int = -1) -> None:
        super().__init__(message)
        self.phase = phase
        self.rank = rank
        self.peer = peer


class FallbackWarning(UserWarning):
    """``backend="auto"`` chose the reference backend for a group on CUDA devices (the reason is
    in the message and in ``group.backend_reason``)."""
