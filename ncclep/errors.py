"""Exceptions raised by ncclep."""

from __future__ import annotations


class NcclepError(RuntimeError):
    """Base class of ncclep's own errors."""


class InvalidArgument(ValueError):
    """An argument broke the API contract; nothing was launched and the group stays usable."""


class CommError(NcclepError):
    """A device-side wait expired or a peer reported a failure.

    ``phase`` names the protocol step that was waiting, ``rank`` the rank that saw it and
    ``peer`` the rank it was waiting for (-1 when unknown).
    """

    def __init__(self, message: str, *, phase: str = "", rank: int = -1, peer: int = -1) -> None:
        super().__init__(message)
        self.phase = phase
        self.rank = rank
        self.peer = peer
