"""Timing: the figures users and peers compare, each step behind a barrier, medians, slowest rank.

A *step* runs one or more ops back to back (dispatch then combine, as a MoE layer does) and calls
``mark()`` at each boundary; phase k is what runs between marks k and k+1, and the *total* is the
whole step. :func:`measure_steps` measures steps with one of three clocks (:func:`time_steps`
gives the phases alone):

``event``
    CUDA events recorded at the marks (``time.perf_counter`` on CPU processes).
``kernel``
    device time of the kernels launched inside each phase, from the torch profiler (CUPTI): each
    phase runs inside a ``record_function`` range, and the durations of the device activities
    (kernels, memcpy, memset) that the profiler links to that range or to the ops under it are
    summed. What ran outside the ranges (the barrier's all-reduce, the sleep kernel) is not
    counted. This is what DeepEP's and NCCL EP's tests print.
``host``
    ``time.perf_counter`` at the marks: the CPU time of the eager calls. With ``queue_ahead`` the
    GPU is still busy with the sleep kernel while the host runs the step, so the host never waits
    for the GPU; samples where the sleep had finished before the step returned are counted
    (:attr:`Measured.host_overran`).

On GPUs every timed step follows a barrier, an all-reduce on the op's stream (every rank's op
starts when the all-reduce completes everywhere, a few µs apart, not when each host gets to
launch it), then, with ``queue_ahead``, a ~1 ms sleep kernel: the launches are ahead of the GPU
as in a model, and the events time the ops on the device, not the host's launch work after a
drained queue. ``queue_ahead=False`` gives the drained-queue figures.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

QUEUE_AHEAD_CYCLES = 2_000_000  # ~1 ms at H100/H200 clocks: longer than any step's host launch work
CLOCKS = ("event", "kernel", "host")
RANGE_PREFIX = "ncclep.bench/"
_RANGE = re.compile(rf"^{re.escape(RANGE_PREFIX)}step(\d+)/phase(\d+)$")

Mark = Callable[[], None]


@dataclass
class Timing:
    median_us: float
    p90_us: float
    samples: int


@dataclass
class Measured:
    """One rank's timings of a step: each phase's, and the whole step's."""

    phases: list[Timing]
    total: Timing
    kernels: list[dict[str, float]] = field(default_factory=list)
    """``kernel`` clock: per phase, each kernel's median device µs per call (by cleaned name)."""
    host_overran: int = 0
    """``host`` clock on GPUs: samples where the GPU had drained before the host finished."""


def summarize(samples_us: list[float]) -> Timing:
    ordered = sorted(samples_us)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return Timing(statistics.median(ordered), p90, len(ordered))


def range_name(step: int, phase: int) -> str:
    return f"{RANGE_PREFIX}step{step}/phase{phase}"


def kernel_name(raw: str) -> str:
    """A kernel's name without ``void``, the namespace ncclep and its argument list (a
    ``Memset (Device)`` keeps its parenthesis)."""
    name = raw.replace("(anonymous namespace)::", "").strip()
    paren = name.find("(")
    if paren > 0 and not name[paren - 1].isspace():
        name = name[:paren]
    return name.removeprefix("void ").removeprefix("ncclep::")


def _kernels_under(event: Any) -> dict[str, float]:
    """Device µs per kernel name launched inside ``event`` or any CPU event nested in it."""
    out: dict[str, float] = {}
    stack = [event]
    while stack:
        e = stack.pop()
        for k in e.kernels:
            if k.name.startswith(RANGE_PREFIX):
                continue  # the range's own GPU-side annotation, not a kernel
            name = kernel_name(k.name)
            out[name] = out.get(name, 0.0) + float(k.duration)
        stack.extend(e.cpu_children)
    return out


def kernel_times(events: Iterable[Any], phases: int) -> list[list[dict[str, float]]]:
    """From the profiler's events (``prof.events()``): per step, in step order, per phase, the
    device µs of each kernel linked to the phase's range (:func:`range_name`)."""
    cpu = torch.autograd.DeviceType.CPU
    steps: dict[int, list[dict[str, float] | None]] = {}
    for e in events:
        if e.device_type != cpu:
            continue
        match = _RANGE.match(e.name)
        if match is None:
            continue
        step, phase = int(match.group(1)), int(match.group(2))
        if phase >= phases:
            raise ValueError(f"range {e.name!r}: a step has {phases} phases")
        per_phase = steps.setdefault(step, [None] * phases)
        if per_phase[phase] is None:
            per_phase[phase] = _kernels_under(e)
    out = []
    for step in sorted(steps):
        per_phase = steps[step]
        if any(p is None for p in per_phase):
            raise ValueError(f"the profile lacks a phase range of step {step}")
        out.append([p for p in per_phase if p is not None])
    return out


def summarize_kernels(per_step: list[list[dict[str, float]]], phases: int) -> Measured:
    """Each phase's device time per step (its kernels summed), the step's (its phases summed),
    and each kernel's median per call."""
    if not per_step:
        raise ValueError("no profiled step")
    phase_samples = [[sum(step[k].values()) for step in per_step] for k in range(phases)]
    totals = [sum(phase_samples[k][i] for k in range(phases)) for i in range(len(per_step))]
    kernels = []
    for k in range(phases):
        names = sorted({n for step in per_step for n in step[k]})
        kernels.append({n: statistics.median(step[k].get(n, 0.0) for step in per_step) for n in names})
    return Measured([summarize(s) for s in phase_samples], summarize(totals), kernels)


class _RangeMarks:
    """``mark()`` for the kernel clock: mark k closes phase k-1's profiler range, opens phase k's."""

    def __init__(self, step: int, phases: int) -> None:
        self.step, self.phases, self.count = step, phases, 0
        self.open: Any = None

    def __call__(self) -> None:
        if self.open is not None:
            self.open.__exit__(None, None, None)
            self.open = None
        if self.count < self.phases:
            self.open = torch.profiler.record_function(range_name(self.step, self.count))
            self.open.__enter__()
        self.count += 1

    def close(self) -> None:
        if self.open is not None:
            self.open.__exit__(None, None, None)
            self.open = None


def _no_mark() -> None:
    pass


def _barrier(token: torch.Tensor | None, group: dist.ProcessGroup | None, queue_ahead: bool) -> None:
    if token is None:
        dist.barrier(group=group)
        return
    dist.all_reduce(token, group=group)
    if queue_ahead:
        torch.cuda._sleep(QUEUE_AHEAD_CYCLES)
    else:
        torch.cuda.synchronize(token.device)


def time_steps(
    step: Callable[[int, Mark], Any],
    phases: int,
    *,
    warmup: int,
    iters: int,
    device: torch.device,
    group: dist.ProcessGroup | None,
    queue_ahead: bool = True,
    clock: str = "event",
) -> list[Timing]:
    """Each phase's timing: :func:`measure_steps`'s ``phases`` (examples/moe_layer.py uses it)."""
    return measure_steps(
        step,
        phases,
        warmup=warmup,
        iters=iters,
        device=device,
        group=group,
        queue_ahead=queue_ahead,
        clock=clock,
    ).phases


def measure_steps(
    step: Callable[[int, Mark], Any],
    phases: int,
    *,
    warmup: int,
    iters: int,
    device: torch.device,
    group: dist.ProcessGroup | None,
    queue_ahead: bool = True,
    clock: str = "event",
) -> Measured:
    """Run ``step(i, mark)`` ``warmup`` times untimed, then ``iters`` times timed with ``clock``."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    on_gpu = device.type == "cuda"
    if clock == "kernel" and not on_gpu:
        raise ValueError("the kernel clock needs CUDA devices")
    for i in range(warmup):
        step(i, _no_mark)
    if on_gpu:
        torch.cuda.synchronize(device)
    token = torch.zeros(1, device=device) if on_gpu else None
    if clock == "kernel":
        return _profile_steps(step, phases, warmup, iters, device, group, queue_ahead, token)

    use_events = clock == "event" and on_gpu
    stream = torch.cuda.current_stream(device) if on_gpu else None
    runs: list[list[Any]] = []
    overran = 0
    for i in range(iters):
        _barrier(token, group, queue_ahead)
        ready = None
        if clock == "host" and on_gpu and queue_ahead:
            ready = torch.cuda.Event()
            ready.record(stream)
        marks: list[Any] = []

        def mark(marks: list[Any] = marks) -> None:
            if use_events:
                event = torch.cuda.Event(enable_timing=True)
                event.record(stream)
                marks.append(event)
            else:
                marks.append(time.perf_counter())

        step(warmup + i, mark)
        if len(marks) != phases + 1:
            raise RuntimeError(f"a step must mark {phases + 1} times, it marked {len(marks)}")
        if ready is not None:
            overran += bool(ready.query())
        if clock == "host" and on_gpu:
            torch.cuda.synchronize(device)  # the next step's host work starts on an idle queue again
        runs.append(marks)
    if on_gpu:
        torch.cuda.synchronize(device)

    def us(a: Any, b: Any) -> float:
        return a.elapsed_time(b) * 1e3 if use_events else (b - a) * 1e6

    per_phase = [[us(m[k], m[k + 1]) for m in runs] for k in range(phases)]
    totals = [us(m[0], m[phases]) for m in runs]
    return Measured([summarize(s) for s in per_phase], summarize(totals), host_overran=overran)


def _profile_steps(
    step: Callable[[int, Mark], Any],
    phases: int,
    warmup: int,
    iters: int,
    device: torch.device,
    group: dist.ProcessGroup | None,
    queue_ahead: bool,
    token: torch.Tensor | None,
) -> Measured:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(iters):
            _barrier(token, group, queue_ahead)
            marks = _RangeMarks(i, phases)
            try:
                step(warmup + i, marks)
            finally:
                marks.close()
            if marks.count != phases + 1:
                raise RuntimeError(f"a step must mark {phases + 1} times, it marked {marks.count}")
        torch.cuda.synchronize(device)
    return summarize_kernels(kernel_times(prof.events(), phases), phases)


def capture_graph(fn: Callable[[], T], device: torch.device | None = None) -> tuple[torch.cuda.CUDAGraph, T]:
    """Capture ``fn()`` in a CUDA graph: the graph, and what the captured call returned (its tensors
    are the graph's static outputs). ``fn`` runs once first on a side stream, so that lazy set-up
    and first allocations happen outside the capture."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def time_graph_replays(
    captures: list[Callable[[], Any]],
    *,
    warmup: int,
    iters: int,
    device: torch.device,
    group: dist.ProcessGroup | None,
    queue_ahead: bool = True,
) -> Timing:
    """Capture each of ``captures`` in a CUDA graph (one per input set) and time the replays,
    rotating through the graphs, with CUDA events around each replay."""
    graphs = [capture_graph(fn, device)[0] for fn in captures]

    def replay(i: int, mark: Mark) -> None:
        mark()
        graphs[i % len(graphs)].replay()
        mark()

    return time_steps(
        replay, 1, warmup=warmup, iters=iters, device=device, group=group, queue_ahead=queue_ahead
    )[0]


def slowest_of(timings: list[Timing | None]) -> Timing | None:
    """The timing with the largest median (the rank every rank waits for); None if any is None."""
    if not timings or any(t is None for t in timings):
        return None
    return max((t for t in timings if t is not None), key=lambda t: t.median_us)


def slowest(timing: Timing | None, group: dist.ProcessGroup | None) -> Timing | None:
    """:func:`slowest_of` over the ranks of ``group`` (collective)."""
    world: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(world, timing, group=group)
    return slowest_of(world)


def slowest_kernels(kernels: dict[str, float], group: dist.ProcessGroup | None) -> dict[str, float]:
    """Each kernel's largest median over the ranks of ``group`` (collective)."""
    world: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(world, kernels, group=group)
    names = sorted({n for k in world for n in k})
    return {n: max(k.get(n, 0.0) for k in world) for n in names}
