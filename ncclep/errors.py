"""Exceptions raised by ncclep. ``except ncclep.NcclepError`` catches every one of them."""

from __future__ import annotations

from . import _native

# Why an input was rejected, as a small code that travels to the peers (the reference backend's
# header exchange carries it, the CUDA kernels the words their peers wait on). 0 is "no problem".
# The C library owns the codes and names (ncclepRejectReason_t, ncclepRejectReasonName); this copy
# serves the pure-Python install and tests/test_kernel_facts.py checks it against C. The text is
# what a peer's CommError says when the full message is not available.
REJECT_REASONS: dict[str, tuple[int, str]] = {
    "bad_input": (1, "an invalid argument"),
    "type": (2, "an argument of the wrong type"),
    "dtype": (3, "a tensor of the wrong dtype"),
    "shape": (4, "a tensor of the wrong shape"),
    "device": (5, "a tensor on the wrong device"),
    "layout": (6, "a non-contiguous tensor"),
    "tokens": (7, "more tokens than max_tokens_per_rank"),
    "hidden": (8, "a hidden size the group cannot take"),
    "topk": (9, "a top-k the group cannot take"),
    "expert_id": (10, "an expert id out of range"),
    "duplicate_expert": (11, "a token naming the same expert twice"),
    "handle": (12, "a handle that does not belong to this call"),
    "mode": (13, "an op of the other mode"),
    "option": (14, "an invalid option"),
}
REASON_OF_CODE: dict[int, str] = {code: name for name, (code, _) in REJECT_REASONS.items()}


def reject_reason(code: int) -> str:
    """The name of a reject code: the C library's where the extension is, else this module's copy."""
    if _native.available():
        return str(_native.module().reject_reason_name(code))
    return REASON_OF_CODE.get(code, "unknown")


class NcclepError(Exception):
    """Base class of ncclep's own errors."""


class InvalidArgument(NcclepError, ValueError):
    """An argument broke the API contract. Nothing was moved and the group stays usable; the
    group's peers raise :class:`CommError` naming this rank for the same call (on the CUDA
    backend at their next call: see :class:`ncclep.Group`).

    ``reason`` is a key of :data:`REJECT_REASONS` (e.g. ``"dtype"``, ``"tokens"``, ``"handle"``).
    """

    def __init__(self, message: str, *, reason: str = "bad_input") -> None:
        super().__init__(message)
        if reason not in REJECT_REASONS:
            reason = "bad_input"
        self.reason = reason

    @property
    def code(self) -> int:
        """The reason as the small integer peers receive."""
        return REJECT_REASONS[self.reason][0]


# CommError.reason values
PEER_REJECTED = "peer_rejected"  # a peer rejected its input; the group stays usable
TIMEOUT = "timeout"  # a wait passed timeout_s; the group is broken
PEER_LOST = "peer_lost"  # a peer's connection closed (its process died); the group is broken
MISMATCH = "mismatch"  # ranks called different ops, groups or call counts; the group is broken
BROKEN = "broken"  # the group broke earlier (here, or a peer gave up on it); it is broken
DEVICE = "device"  # a kernel reported a protocol error; the group is broken


class CommError(NcclepError, RuntimeError):
    """A wait expired, a peer failed, or a peer rejected its input of a call.

    ``phase`` names the protocol step that was waiting, ``rank`` the rank that saw it and
    ``peer`` the rank it concerns (-1 when unknown). ``reason`` says what happened:

    - ``"peer_rejected"``: rank ``peer`` raised :class:`InvalidArgument` for a call, and the
      group stays usable (``group_usable``). Reference backend: for this call; nothing was moved
      or returned anywhere. CUDA backend: for the call that ``phase`` names, which returned here
      without that rank's part (discard its outputs); this call took no part: make it again.
    - ``"timeout"``, ``"peer_lost"``, ``"mismatch"``, ``"broken"``, ``"device"``: the group is
      broken: every later call on it raises ``CommError(reason="broken")`` at once. Close it and
      open a new :class:`ncclep.Group`; after ``"timeout"`` or ``"peer_lost"`` on the reference
      backend, open it on a new process group (``dist.new_group``), since the old one may still
      hold the abandoned exchange.
    """

    def __init__(
        self, message: str, *, phase: str = "", rank: int = -1, peer: int = -1, reason: str = TIMEOUT
    ) -> None:
        super().__init__(message)
        self.phase = phase
        self.rank = rank
        self.peer = peer
        self.reason = reason

    @property
    def group_usable(self) -> bool:
        """Whether the group that raised this can take the next call (only after a peer's bad input)."""
        return self.reason == PEER_REJECTED


class FallbackWarning(UserWarning):
    """``backend="auto"`` chose the reference backend for a group on CUDA devices (the reason is
    in the message and in ``group.backend_reason``)."""
