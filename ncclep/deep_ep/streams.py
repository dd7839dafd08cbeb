"""Where a Buffer call runs on CUDA, and the event it hands back (DeepEP's stream semantics).

DeepEP runs its ops on a communication stream of its own. ``previous_event`` makes that stream
wait for an event instead of for the whole current stream; ``async_finish`` returns an event
instead of making the current stream wait; ``allocate_on_comm_stream`` lets the outputs belong to
the communication stream. The shim does the same with one difference that costs nothing: a call
without ``async_finish`` runs on the current stream itself (DeepEP's comm stream would be waited
for at once anyway). With ``async_finish`` it runs on the Buffer's communication stream, records
an event there, and marks inputs and outputs as used by both streams (``record_stream``), so the
caching allocator cannot hand their memory out early.

Calls on one ncclep group must reach the device in order, whatever streams they run on: each
launch waits for the previous launch's event. On the CPU none of this exists; an
``async_finish`` call returns an event that has already passed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .utils import EventHandle, EventOverlap


class StreamState:
    """A Buffer's communication streams (one per device) and where its last launch ran.

    A launch on another stream than the last one first waits for the last one's event; launches
    on one stream need nothing (stream order). Inside CUDA graph capture neither happens: the
    graph orders what it captured, and an event recorded outside the capture cannot be waited for
    inside it.
    """

    def __init__(self) -> None:
        self._comm: dict[int, torch.cuda.Stream] = {}
        self._last: tuple[torch.cuda.Stream, torch.cuda.Event] | None = None

    def comm_stream(self, device: torch.device) -> torch.cuda.Stream:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._comm:
            self._comm[index] = torch.cuda.Stream(device=index)
        return self._comm[index]

    def wait_for_last_launch(self, stream: torch.cuda.Stream) -> None:
        if self._last is None or torch.cuda.is_current_stream_capturing():
            return
        last_stream, event = self._last
        if last_stream != stream:
            stream.wait_event(event)

    def note_launch(self, stream: torch.cuda.Stream) -> None:
        if torch.cuda.is_current_stream_capturing():
            return
        event = torch.cuda.Event()
        event.record(stream)
        self._last = (stream, event)


def _cuda_event(previous_event: Any) -> torch.cuda.Event | None:
    handle = getattr(previous_event, "event", None)
    return getattr(handle, "event", None)


class Launch:
    """One call's streams: ``with Launch(...) as launch: ...; event = launch.finish(inputs, outputs)``.

    Arguments:
        state: the Buffer's :class:`StreamState`.
        device: the device of the call's tensors.
        previous_event: an :class:`EventOverlap` to wait for before the call, or None.
        async_finish: run on the communication stream and return its event.
    """

    def __init__(
        self, state: StreamState, device: torch.device, previous_event: Any, async_finish: bool
    ) -> None:
        self.state = state
        self.cuda = device.type == "cuda"
        self.device = device
        self.previous = _cuda_event(previous_event) if self.cuda else None
        self.async_finish = async_finish
        self._context: Any = None

    def __enter__(self) -> Launch:
        if not self.cuda:
            return self
        self.compute = torch.cuda.current_stream(self.device)
        self.stream = self.state.comm_stream(self.device) if self.async_finish else self.compute
        if self.previous is not None:
            self.stream.wait_event(self.previous)
        elif self.async_finish:
            self.stream.wait_stream(self.compute)
        self.state.wait_for_last_launch(self.stream)
        self._context = torch.cuda.stream(self.stream)
        self._context.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._context is not None:
            self._context.__exit__(*exc)
            self._context = None

    def finish(self, inputs: Sequence[Any], outputs: Sequence[Any]) -> EventOverlap:
        """The call's event (None without ``async_finish``); tensors among ``inputs`` and
        ``outputs`` (None and non-tensors are skipped) stay alive with it."""
        if not self.cuda:
            if not self.async_finish:
                return EventOverlap()
            return EventOverlap(EventHandle.completed(), _tensors(inputs, outputs))
        self.state.note_launch(self.stream)
        if not self.async_finish:
            return EventOverlap()
        if not torch.cuda.is_current_stream_capturing():  # in a graph, extra_tensors keep them
            for t in outputs:
                if isinstance(t, torch.Tensor):
                    t.record_stream(self.compute)
            for t in inputs:
                if isinstance(t, torch.Tensor):
                    t.record_stream(self.stream)
        return EventOverlap(EventHandle(self.stream), _tensors(inputs, outputs))


def _tensors(inputs: Sequence[Any], outputs: Sequence[Any]) -> tuple[torch.Tensor, ...]:
    return tuple(t for t in (*inputs, *outputs) if isinstance(t, torch.Tensor))
