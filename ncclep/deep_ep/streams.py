"""Where a Buffer call runs on CUDA, and the event it hands back (DeepEP's stream semantics).

DeepEP runs its ops on a communication stream of its own. ``previous_event`` makes that stream
wait for an event instead of for the whole current stream; ``async_finish`` returns an event
instead of making the current stream wait; ``allocate_on_comm_stream`` lets the outputs belong to
the communication stream. The shim does the same with one difference that costs nothing: a call
without ``async_finish`` runs on the current stream itself (DeepEP's comm stream would be waited
for at once anyway). With ``async_finish`` it runs on the Buffer's communication stream, records
an event there, and marks inputs and outputs as used by both streams (``record_stream``), so the
caching allocator cannot hand their memory out early.

Calls on one ncclep group must reach the device in order, whatever streams they run on: a launch
on another stream than the previous launch first waits for it. What that costs is paid only by
Buffers that use several streams: while every launch is on one stream, stream order is enough and
a launch records nothing (it compares the current stream with the last one's, one cheap query).
The first launch on another stream waits for the whole of the previous stream (it has no event of
the previous launch, so it takes that stream's current end, which is later); from then on every
launch records an event and the next stream waits for exactly that. ``async_finish`` launches
record their event anyway (it is the one they return). Inside CUDA graph capture none of this
happens: the graph orders what it captured, and an event recorded outside the capture cannot be
waited for inside it. On the CPU none of this exists; an ``async_finish`` call returns an event
that has already passed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .utils import EventHandle, EventOverlap


def _current_stream_handle(index: int) -> int:
    return torch.cuda.current_stream(index).cuda_stream


# The current stream of a device as its raw handle: cheap, no Stream object (torch's own
# inductor uses it); the public route where a build lacks it.
current_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or _current_stream_handle


def _cuda_event(previous_event: Any) -> torch.cuda.Event | None:
    handle = getattr(previous_event, "event", None)
    return getattr(handle, "event", None)


class StreamState:
    """A Buffer's communication streams (one per device) and where its last launch ran."""

    def __init__(self) -> None:
        self._comm: dict[int, torch.cuda.Stream] = {}
        self._last: int | None = None
        """Raw handle of the stream of the last launch (None before the first)."""
        self._last_device = 0
        self._last_event: torch.cuda.Event | None = None
        """An event recorded right after the last launch, when one was."""
        self.record = False
        """Record an event after every launch: set once launches have used two streams."""

    def comm_stream(self, device: torch.device | int) -> torch.cuda.Stream:
        index = device if isinstance(device, int) else device.index
        if index is None:
            index = torch.cuda.current_device()
        stream = self._comm.get(index)
        if stream is None:
            stream = self._comm[index] = torch.cuda.Stream(device=index)
        return stream

    # ------------------------------------------------------------------ launches on the current stream

    def before(self, index: int, previous_event: Any = None) -> None:
        """Before a launch on the current stream of device ``index``: order it after the last
        launch (only when that was on another stream) and after ``previous_event``."""
        if current_raw_stream(index) != self._last:
            self._switch(index, torch.cuda.current_stream(index))
        if previous_event is not None:
            event = _cuda_event(previous_event)
            if event is not None:
                torch.cuda.current_stream(index).wait_event(event)

    def after(self, index: int) -> None:
        """After a launch on the current stream (that :meth:`before` ordered)."""
        if self.record:
            self.note(torch.cuda.current_stream(index))

    def _switch(self, index: int, stream: torch.cuda.Stream) -> None:
        """``stream`` is not the last launch's: make it wait for that launch (outside capture)."""
        if torch.cuda.is_current_stream_capturing():
            return
        if self._last is not None:
            if self._last_event is not None:
                stream.wait_event(self._last_event)
            else:
                stream.wait_stream(torch.cuda.ExternalStream(self._last, device=self._last_device))
            self.record = True
        self._last, self._last_device, self._last_event = stream.cuda_stream, index, None

    def note(self, stream: torch.cuda.Stream, event: torch.cuda.Event | None = None) -> None:
        """The last launch ran on ``stream``; ``event`` (recorded here if None) marks its end."""
        if torch.cuda.is_current_stream_capturing():
            return
        if event is None:
            event = torch.cuda.Event()
            event.record(stream)
        self._last, self._last_device, self._last_event = stream.cuda_stream, stream.device.index, event


class Launch:
    """One call's streams: ``with Launch(...) as launch: ...; event = launch.finish(inputs, outputs)``.

    Arguments:
        state: the Buffer's :class:`StreamState`.
        device: the device of the call's tensors.
        previous_event: an :class:`EventOverlap` to wait for before the call, or None.
        async_finish: run on the communication stream and return its event.

    Calls without ``async_finish`` on CUDA need no Launch: ``state.before(index, previous_event)``
    before the launch and, when ``state.record``, ``state.after(index)`` after it do the same.
    """

    __slots__ = ("async_finish", "compute", "cuda", "index", "previous", "state", "stream")

    def __init__(
        self, state: StreamState, device: torch.device, previous_event: Any, async_finish: bool
    ) -> None:
        self.state = state
        self.cuda = device.type == "cuda"
        self.index = device.index
        self.previous = previous_event
        self.async_finish = async_finish
        self.stream: torch.cuda.Stream | None = None

    def __enter__(self) -> Launch:
        if not self.cuda:
            return self
        if self.index is None:
            self.index = torch.cuda.current_device()
        if not self.async_finish:
            self.state.before(self.index, self.previous)
            return self
        state = self.state
        compute = self.compute = torch.cuda.current_stream(self.index)
        stream = state.comm_stream(self.index)
        previous = _cuda_event(self.previous)
        if previous is not None:
            stream.wait_event(previous)
        else:
            stream.wait_stream(compute)
        if state._last != stream.cuda_stream:
            if previous is not None or state._last != compute.cuda_stream:
                state._switch(self.index, stream)
            elif not torch.cuda.is_current_stream_capturing():
                state.record = True  # the compute stream's launches are covered by wait_stream above
        torch.cuda.set_stream(stream)
        self.stream = stream
        return self

    def __exit__(self, *exc: object) -> None:
        if self.stream is not None:
            torch.cuda.set_stream(self.compute)
            self.stream = None

    def finish(self, inputs: Sequence[Any], outputs: Sequence[Any]) -> EventOverlap:
        """The call's event (None without ``async_finish``); tensors among ``inputs`` and
        ``outputs`` (None and non-tensors are skipped) stay alive with it."""
        if not self.async_finish:
            if self.cuda and self.state.record:
                self.state.after(self.index)
            return EventOverlap()
        kept = tuple(t for t in (*inputs, *outputs) if t is not None)
        if not self.cuda:
            return EventOverlap(EventHandle.completed(), kept)
        stream = self.stream
        assert stream is not None
        event = torch.cuda.Event()
        event.record(stream)
        self.state.note(stream, event)
        if not torch.cuda.is_current_stream_capturing():  # in a graph, extra_tensors keep them
            compute = self.compute
            for t in outputs:
                if t is not None:
                    t.record_stream(compute)
            for t in inputs:
                if t is not None:
                    t.record_stream(stream)
        return EventOverlap(EventHandle.of(event), kept)
