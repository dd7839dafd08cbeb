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
launch records its stream's mark event (one per stream, recorded again at each launch) and the
next stream waits for exactly that. ``async_finish`` launches
record their event anyway (it is the one they return). Inside CUDA graph capture none of this
happens: the graph orders what it captured, and an event recorded outside the capture cannot be
waited for inside it. On the CPU none of this exists; an ``async_finish`` call returns an event
that has already passed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .utils import NO_EVENT, EventHandle, EventOverlap


def _current_stream_handle(index: int) -> int:
    return torch.cuda.current_stream(index).cuda_stream


# The current stream of a device as its raw handle: cheap, no Stream object (torch's own
# inductor uses it); the public route where a build lacks it.
current_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or _current_stream_handle


_raw_set_stream = getattr(torch._C, "_cuda_setStream", None)
_capturing = (
    getattr(torch._C, "_cuda_isCurrentStreamCapturing", None) or torch.cuda.is_current_stream_capturing
)


def _set_stream(stream: torch.cuda.Stream) -> None:
    """``torch.cuda.set_stream`` less its Python wrapper (half its host time), where the build
    has the raw call."""
    if _raw_set_stream is None:
        torch.cuda.set_stream(stream)
    else:
        _raw_set_stream(stream.stream_id, stream.device_index, stream.device_type)


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
        self._marks: dict[int, tuple[torch.cuda.Event, torch.cuda.Stream]] = {}
        """Per stream (raw handle), the event that marks the end of the last launch on it."""

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
        """After a launch on the current stream (that :meth:`before` ordered just before), when the
        Buffer records: the stream's own mark event, recorded again (a later ``wait_event`` takes the
        record current when it is called, so one event per stream serves every launch on it)."""
        if not self.record or _capturing():
            return
        # before() made the current stream the last launch's (outside capture)
        event, stream = self.mark(self._last, index)  # type: ignore[arg-type]  # set by before()
        event.record(stream)
        self._last_event = event

    def mark(self, raw: int, index: int) -> tuple[torch.cuda.Event, torch.cuda.Stream]:
        """The mark event of the current stream of device ``index`` (raw handle ``raw``), and that
        stream as a Stream object: both made at the stream's first use, so that a call neither
        makes an event nor asks torch for the current Stream (microseconds each on slow hosts)."""
        mark = self._marks.get(raw)
        if mark is None:
            mark = self._marks[raw] = (torch.cuda.Event(), torch.cuda.current_stream(index))
        return mark

    # ------------------------------------------------------------------ a call, on either stream

    def enter(self, cuda: bool, index: int | None, previous_event: Any, async_finish: bool) -> Launch | None:
        """Before a call's launches, its tensors on CUDA device ``index`` (``cuda``) or on the CPU.
        With ``async_finish``: its :class:`Launch`, entered (the communication stream is current
        and waits for ``previous_event``, else for the current stream); the caller must
        :meth:`finish` it, then ``__exit__`` it (also on an error). Without: None, the current
        stream ordered as :meth:`before` does (on CUDA)."""
        if async_finish:
            return Launch(self, cuda, index, previous_event).__enter__()
        if cuda:
            self.before(index, previous_event)  # type: ignore[arg-type]  # set on CUDA
        return None

    def finish(
        self,
        launch: Launch | None,
        cuda: bool,
        index: int | None,
        inputs: Sequence[Any] = (),
        outputs: Sequence[Any] = (),
    ) -> EventOverlap:
        """After the launches of a call that :meth:`enter` began: with a ``launch``, the event it
        records on the communication stream, and ``inputs`` and ``outputs`` marked as used by both
        streams and kept with the event (:meth:`Launch.finish`); without, an empty EventOverlap,
        after :meth:`after` (when the Buffer records)."""
        if launch is None:
            if self.record and cuda:
                self.after(index)  # type: ignore[arg-type]  # set on CUDA
            return NO_EVENT
        return launch.finish(inputs, outputs)

    def _switch(self, index: int, stream: torch.cuda.Stream) -> None:
        """``stream`` is not the last launch's: make it wait for that launch (outside capture)."""
        if _capturing():
            return
        if self._last is not None:
            if self._last_event is not None:
                stream.wait_event(self._last_event)
            else:
                stream.wait_stream(torch.cuda.ExternalStream(self._last, device=self._last_device))
            self.record = True
        self._last, self._last_device, self._last_event = stream.cuda_stream, index, None

    def note(self, stream: torch.cuda.Stream, index: int, event: torch.cuda.Event) -> None:
        """The last launch ran on ``stream`` of device ``index``; ``event``, recorded there, marks
        its end."""
        if _capturing():
            return
        self._last, self._last_device, self._last_event = stream.cuda_stream, index, event


class Launch:
    """One ``async_finish`` call's streams, made current by :meth:`StreamState.enter` and ended by
    :meth:`StreamState.finish` (then ``__exit__``, which makes the caller's stream current again).

    Arguments:
        state: the Buffer's :class:`StreamState`.
        cuda, index: whether the call's tensors are on CUDA, and their device.
        previous_event: an :class:`EventOverlap` to wait for before the call, or None.
    """

    __slots__ = ("compute", "cuda", "index", "previous", "state", "stream")

    def __init__(self, state: StreamState, cuda: bool, index: int | None, previous_event: Any) -> None:
        self.state = state
        self.cuda = cuda
        self.index = index
        self.previous = previous_event
        self.stream: torch.cuda.Stream | None = None

    def __enter__(self) -> Launch:
        if not self.cuda:
            return self
        if self.index is None:
            self.index = torch.cuda.current_device()
        state = self.state
        raw = current_raw_stream(self.index)
        mark, compute = state.mark(raw, self.index)
        self.compute = compute
        stream = state.comm_stream(self.index)
        previous = _cuda_event(self.previous)
        if previous is not None:
            stream.wait_event(previous)
        else:  # the compute stream's end so far (its mark, recorded again: see StreamState.after)
            mark.record(compute)
            stream.wait_event(mark)
        if state._last != stream.cuda_stream:
            if previous is not None or state._last != raw:
                state._switch(self.index, stream)
            elif not _capturing():
                state.record = True  # the compute stream's launches are covered by the wait above
        _set_stream(stream)
        self.stream = stream
        return self

    def __exit__(self, *exc: object) -> None:
        if self.stream is not None:
            _set_stream(self.compute)
            self.stream = None

    def finish(self, inputs: Sequence[Any], outputs: Sequence[Any]) -> EventOverlap:
        """The call's event; the tensors of ``inputs`` and ``outputs`` (see :func:`tensors_in`) stay
        alive with it."""
        ins, outs = tensors_in(inputs), tensors_in(outputs)
        kept = (*ins, *outs)
        if not self.cuda:
            return EventOverlap(EventHandle.completed(), kept)
        stream = self.stream
        assert stream is not None
        event = torch.cuda.Event()
        event.record(stream)
        self.state.note(stream, self.index, event)
        if not _capturing():  # in a graph, extra_tensors keep them
            compute = self.compute
            for t in outs:
                t.record_stream(compute)
            for t in ins:
                t.record_stream(stream)
        return EventOverlap(EventHandle.of(event), kept)


def tensors_in(items: Sequence[Any]) -> list[torch.Tensor]:
    """The tensors of ``items``, in order: a tensor; None (skipped); a tuple of tensors and None;
    or an ncclep handle (its ``tensors()``)."""
    flat: list[torch.Tensor] = []
    for t in items:
        if t is None:
            continue
        if isinstance(t, torch.Tensor):
            flat.append(t)
        elif isinstance(t, tuple):
            flat.extend(u for u in t if u is not None)
        else:
            flat.extend(t.tensors())
    return flat
