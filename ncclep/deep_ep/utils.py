"""Events, as DeepEP's ``deep_ep.utils`` has them: :class:`EventHandle` and :class:`EventOverlap`.

On CUDA an event is a real CUDA event recorded on a stream, which other streams can wait for. On
the CPU there are no streams: every op has finished when it returns, so an event is complete from
the start and waiting for it does nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InvalidArgument


class EventHandle:
    """A point on a stream that the current stream can wait for (DeepEP's ``EventHandle``).

    Arguments:
        stream: the CUDA stream to record on; None: the current stream, when this process has
            initialised CUDA (if it has not, there is no device work to wait for and the event is
            complete from the start, as on the CPU).
    """

    def __init__(self, stream: torch.cuda.Stream | None = None) -> None:
        self.event: torch.cuda.Event | None = None
        if stream is None and torch.cuda.is_available() and torch.cuda.is_initialized():
            stream = torch.cuda.current_stream()
        if stream is not None:
            self.event = torch.cuda.Event()
            self.event.record(stream)

    @classmethod
    def of(cls, event: torch.cuda.Event) -> EventHandle:
        """A handle of ``event``, already recorded."""
        handle = cls.__new__(cls)
        handle.event = event
        return handle

    @classmethod
    def completed(cls) -> EventHandle:
        """An event that has already passed: what ops on the CPU return."""
        handle = cls.__new__(cls)
        handle.event = None
        return handle

    def current_stream_wait(self) -> None:
        """Make the current CUDA stream wait for this event (nothing on the CPU)."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def __repr__(self) -> str:
        return f"EventHandle({'cuda' if self.event is not None else 'complete'})"


class EventOverlap:
    """An event and the tensors that must live until it has passed (DeepEP's ``EventOverlap``).

    Arguments:
        event: the event of an op called with ``async_finish=True``; None when the op was
            synchronous (the current stream already waits for it).
        extra_tensors: tensors kept alive with the event (the op's inputs and outputs), the way
            ``record_stream`` would, but compatible with CUDA graphs.

    ``with event_overlap: ...`` runs the block, then makes the current stream wait for the event.
    """

    def __init__(
        self, event: EventHandle | None = None, extra_tensors: tuple[Any, ...] | None = None
    ) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """The current stream waits for the event (DeepEP asserts there is one; so does this)."""
        if self.event is None:
            raise InvalidArgument(
                "this EventOverlap holds no event: the op was called without async_finish=True"
            )
        self.event.current_stream_wait()

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        if self.event is not None:
            self.event.current_stream_wait()


NO_EVENT = EventOverlap()
"""What a call without ``async_finish`` returns: one EventOverlap without an event, shared."""

__all__ = ["EventHandle", "EventOverlap"]
