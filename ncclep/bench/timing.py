"""Timing per BENCHMARKS.md: device events around each op, a barrier before every step, medians.

A *step* runs one or more ops back to back (dispatch then combine, as a MoE layer does) and calls
``mark()`` at each boundary; phase k's time is between marks k and k+1.

On GPUs each step is queued behind a ~1 ms sleep kernel that follows the barrier, so the events
time the ops on the device, not the host's launch work after a drained queue (which the barrier
would otherwise put between the first mark and the first kernel). In a model the queue is ahead
of the GPU, as it is here; ``queue_ahead=False`` gives the drained-queue figure.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

QUEUE_AHEAD_CYCLES = 2_000_000  # ~1 ms at H100/H200 clocks: longer than any step's host launch work

Mark = Callable[[], None]


@dataclass
class Timing:
    median_us: float
    p90_us: float
    samples: int


def summarize(samples_us: list[float]) -> Timing:
    ordered = sorted(samples_us)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return Timing(statistics.median(ordered), p90, len(ordered))


def time_steps(
    step: Callable[[int, Mark], Any],
    phases: int,
    *,
    warmup: int,
    iters: int,
    device: torch.device,
    group: dist.ProcessGroup | None,
    queue_ahead: bool = True,
) -> list[Timing]:
    """Run ``step(i, mark)`` ``warmup`` times untimed, then ``iters`` times timed."""
    for i in range(warmup):
        step(i, lambda: None)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.synchronize(device)
        stream = torch.cuda.current_stream(device)
    runs: list[list[Any]] = []
    # On GPUs the barrier is an all-reduce on the op's stream: every rank's op starts when the
    # all-reduce completes everywhere (a few µs apart), not when each host gets to launch it
    # (host launch skew of tens of µs would otherwise be timed as waiting for peers).
    token = torch.zeros(1, device=device) if on_gpu else None
    for i in range(iters):
        if token is not None:
            dist.all_reduce(token, group=group)
            if queue_ahead:
                torch.cuda._sleep(QUEUE_AHEAD_CYCLES)
        else:
            dist.barrier(group=group)
        marks: list[Any] = []

        def mark(marks: list[Any] = marks) -> None:
            if on_gpu:
                event = torch.cuda.Event(enable_timing=True)
                event.record(stream)
                marks.append(event)
            else:
                marks.append(time.perf_counter())

        step(warmup + i, mark)
        if len(marks) != phases + 1:
            raise RuntimeError(f"a step must mark {phases + 1} times, it marked {len(marks)}")
        runs.append(marks)
    if on_gpu:
        torch.cuda.synchronize(device)
    per_phase: list[list[float]] = [[] for _ in range(phases)]
    for marks in runs:
        for k in range(phases):
            a, b = marks[k], marks[k + 1]
            per_phase[k].append(a.elapsed_time(b) * 1e3 if on_gpu else (b - a) * 1e6)
    return [summarize(samples) for samples in per_phase]


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
    capture: Callable[[], Any],
    *,
    warmup: int,
    iters: int,
    device: torch.device,
    group: dist.ProcessGroup | None,
    queue_ahead: bool = True,
) -> Timing:
    """Capture ``capture()`` once in a CUDA graph and time its replays."""
    graph, _ = capture_graph(capture, device)

    def replay(_i: int, mark: Mark) -> None:
        mark()
        graph.replay()
        mark()

    return time_steps(
        replay, 1, warmup=warmup, iters=iters, device=device, group=group, queue_ahead=queue_ahead
    )[0]


def slowest(timing: Timing | None, group: dist.ProcessGroup | None) -> Timing | None:
    """The timing of the rank with the largest median: the one every rank waits for."""
    world: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(world, timing, group=group)
    if any(t is None for t in world):
        return None
    return max(world, key=lambda t: t.median_us)
