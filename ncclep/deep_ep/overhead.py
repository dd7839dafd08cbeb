"""What the DeepEP shim adds to each call: the shim's ops against the ncclep Group ops they run on.

    python -m ncclep.deep_ep.overhead                     # 2 gloo processes, reference backend
    python -m ncclep.deep_ep.overhead --world 4 --iters 400 --json overhead.json
    python -m ncclep.deep_ep.overhead --gpu --world 4     # one GPU per process, NCCL, CUDA kernels
    python -m ncclep.deep_ep.overhead --only ll_dispatch  # the calls whose name contains this
    python -m ncclep.deep_ep.overhead --gpu --batch 10    # 10 calls back to back per sample
    python -m ncclep.deep_ep.overhead --isolate --batch 10  # the shim's own host work alone

Each process makes one :class:`ncclep.deep_ep.Buffer` and ncclep groups of the same sizes, then
calls each shim op and the Group op it stands for (same inputs) in turn, ``--iters`` times each,
and rank 0 prints, per call, the medians of:

* ``shim``: the Buffer call (with ``return_recv_hook``: the call and its hook);
* ``Group``: the ncclep Group op it wraps (with a hook: ``send_only`` and ``wait()``; for an
  ``async_finish`` call, the op overlapped as a caller of ncclep would do it: on a side stream,
  with an event; for ``get_dispatch_layout``, the call of the layout kernel);
* ``shim-Group``: the difference of the two, call by call;
* ``shim own``: the Buffer call less the time spent inside the ncclep Group ops it made (their
  methods, the receive halves of ``send_only`` calls): the shim's host work,
  plus the collectives it adds (the count gather and host read of an exact-size HT dispatch).
  It comes from a third run of the Buffer call with a clock read around each Group op, net of
  the reads' own cost: on some hosts a clock read costs microseconds (no vDSO clock source), so
  ``shim`` and ``Group`` are timed without them.

On GPUs (``--gpu``) the calls only launch, so all four are host times, and ``shim-Group`` is the
figure to hold to the 10 µs budget. On the reference backend (CPU, gloo) a Group op runs to
completion, transfer included, so ``shim`` and ``Group`` vary by a millisecond or more from run to
run and ``shim-Group`` with them; ``shim own`` excludes the Group op and does not. Every call
sample starts after a barrier (on GPUs, after a device synchronisation too), so that waiting for a
late peer is not counted; its results are released after its clock stops. With ``--batch 1`` (the
default) a sample is one call, which meets caches that the barrier left cold; ``--batch n`` times
``n`` calls back to back and reports their mean, the figure of a loop with warm caches.
``--isolate`` replaces the Group ops under the shim (not the Group column's) by ones that replay
a result computed once: ``shim`` (and ``shim own``) is then the shim's host work alone, without
the transport's noise or the caches the real op leaves cold.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .. import fp8
from ..bootstrap import free_port
from ..group import Group, Pending
from ..workloads import make_routing
from .buffer import Buffer
from .layout import dispatch_layout
from .streams import tensors_in

Call = Callable[[], Any]
Pairs = dict[str, tuple[Call, Call]]
"""Per call name: (the shim's call, the Group call it stands for)."""


def _sync(device: torch.device) -> None:
    """Finish the device's work and line the ranks up, so that no call starts by waiting for a
    peer that is still in the previous one (that wait would be counted as the shim's own)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


class InnerClock:
    """Seconds spent inside the ncclep Group ops (and ``Pending.wait``) while it is armed, and how
    many such calls it timed. ``read_cost``: the seconds one clock read takes on this host (its two
    reads around a call add about one read to the time outside the call)."""

    def __init__(self) -> None:
        self.armed = False
        self.seconds = 0.0
        self.calls = 0
        reads = [time.perf_counter() for _ in range(1001)]
        self.read_cost = statistics.median(b - a for a, b in itertools.pairwise(reads))

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.armed:
                return fn(*args, **kwargs)
            self.calls += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        timed._timed = True  # type: ignore[attr-defined]
        return timed


GROUP_OPS = ("ll_dispatch", "ll_combine", "ht_dispatch", "ht_combine", "ht_dispatch_cached")


def watch(clock: InnerClock, buffer: Buffer) -> None:
    """Time the Group ops of ``buffer``'s groups (made by the warm-up calls) and every receive half."""
    for group in buffer.groups:
        for name in GROUP_OPS:
            op = getattr(group, name)
            if not getattr(op, "_timed", False):
                setattr(group, name, clock.wrap(op))
    if not getattr(Pending.wait, "_timed", False):
        timed_wait = clock.wrap(Pending.wait)
        Pending.wait = timed_wait  # type: ignore[method-assign]
        Pending.__call__ = timed_wait  # type: ignore[method-assign]


def _once(seen: dict[Any, Any], key: Any, make: Call, send_only: bool = False) -> Any:
    """``make()``'s result, made at the first call with ``key``; as a Pending with ``send_only``."""
    out = seen.get(key)
    if out is None:
        out = seen[key] = make()
    return Pending(partial(_same, out)) if send_only else out


def _same(value: Any) -> Any:
    return value


def replay(buffer: Buffer) -> None:
    """``--isolate``: the Group ops of ``buffer``'s groups replaced by ones that run the real op
    once per kind of call and then return its result again at once, so that a shim call's time is
    the shim's own host work (its own collectives included)."""
    for group in buffer.groups:
        seen: dict[Any, Any] = {}
        ops = {name: getattr(group, name) for name in GROUP_OPS}

        def ll_dispatch(
            x: Any,
            idx: Any,
            w: Any,
            use_fp8: Any = False,
            ue8m0: Any = False,
            send_only: bool = False,
            column_major_scales: bool = False,
            round_scale: bool = False,
            _op: Any = ops["ll_dispatch"],
            _seen: Any = seen,
        ) -> Any:
            key = ("d", use_fp8, ue8m0, column_major_scales, round_scale)
            make = partial(
                _op,
                x,
                idx,
                w,
                use_fp8,
                ue8m0,
                column_major_scales=column_major_scales,
                round_scale=round_scale,
            )
            return _once(_seen, key, make, send_only)

        def ll_combine(
            rows: Any,
            handle: Any,
            out: Any = None,
            send_only: bool = False,
            topk_weights: Any = None,
            _op: Any = ops["ll_combine"],
            _seen: Any = seen,
        ) -> Any:
            key = ("c", topk_weights is None)
            y = _once(_seen, key, partial(_op, rows, handle, topk_weights=topk_weights))
            return _once({}, 0, partial(_same, y if out is None else out), send_only)

        def ht_dispatch(
            x: Any,
            idx: Any,
            w: Any = None,
            x_scales: Any = None,
            layout: Any = "flat",
            alignment: Any = 1,
            send_only: bool = False,
            _op: Any = ops["ht_dispatch"],
            _seen: Any = seen,
        ) -> Any:
            make = partial(_op, x, idx, w, x_scales, layout, alignment)
            return _once(_seen, ("hd", x_scales is None, w is None), make, send_only)

        def ht_combine(
            rows: Any,
            handle: Any,
            w: Any = None,
            send_only: bool = False,
            _op: Any = ops["ht_combine"],
            _seen: Any = seen,
        ) -> Any:
            return _once(_seen, ("hc", w is None), partial(_op, rows, handle, w), send_only)

        def ht_dispatch_cached(
            t: Any, handle: Any, _op: Any = ops["ht_dispatch_cached"], _seen: Any = seen
        ) -> Any:
            return _once(_seen, ("hx", t.dtype), partial(_op, t, handle))

        group.ll_dispatch, group.ll_combine = ll_dispatch, ll_combine  # type: ignore[method-assign]
        group.ht_dispatch, group.ht_combine = ht_dispatch, ht_combine  # type: ignore[method-assign]
        group.ht_dispatch_cached = ht_dispatch_cached  # type: ignore[method-assign]


def _median_us(values: list[float]) -> float:
    return statistics.median(values) * 1e6


def _time(
    pairs: Pairs,
    iters: int,
    warmup: int,
    batch: int,
    device: torch.device,
    clock: InnerClock,
) -> dict[str, Any]:
    """Medians of each (shim, native) call, of their difference and of the shim's own time,
    interleaved so that drift hits both alike. A sample is ``batch`` calls back to back (their
    total over ``batch``): 1 times a call after a pause, as a single call meets the host; more
    times calls in a loop, with the code and data they touch in the caches."""
    samples: dict[str, dict[str, list[float]]] = {
        name: {"shim": [], "native": [], "diff": [], "own": []} for name in pairs
    }
    results: list[Any] = [None] * batch

    def run(call: Call) -> float:
        """Seconds per call of ``batch`` calls back to back, after the device and the ranks."""
        _sync(device)
        start = time.perf_counter()
        for j in range(batch):
            results[j] = call()
        elapsed = (time.perf_counter() - start) / batch
        results[:] = [None] * batch  # freeing the outputs is not the calls' time (on the CPU it can be)
        return elapsed

    for i in range(warmup + iters):
        for name, (shim_call, native_call) in pairs.items():
            elapsed = run(shim_call)
            native_elapsed = run(native_call)
            # The shim's own time comes from a run of its own: the clock reads the time around
            # every Group op, which costs a few µs a read on some hosts (a clock source without a
            # vDSO) and must not be counted in the shim's column.
            clock.seconds, clock.calls, clock.armed = 0.0, 0, True
            armed = run(shim_call)
            clock.armed = False
            if i >= warmup:
                s = samples[name]
                s["shim"].append(elapsed)
                s["native"].append(native_elapsed)
                s["diff"].append(elapsed - native_elapsed)
                s["own"].append(armed - (clock.seconds + clock.calls * clock.read_cost) / batch)
    return {
        name: {
            "shim_us": _median_us(s["shim"]),
            "native_us": _median_us(s["native"]),
            "diff_us": _median_us(s["diff"]),
            "shim_own_us": _median_us(s["own"]),
        }
        for name, s in samples.items()
    }


def _hooked(call: Call) -> Call:
    """A call returning ``(..., hook)`` followed by its hook."""

    def run() -> Any:
        result = call()
        result[-1]()
        return result

    return run


def _overlapped(device: torch.device, call: Call) -> Call:
    """The Group call as a caller of ncclep overlaps it with compute itself, the native
    counterpart of an ``async_finish`` call: on a side stream that first waits for the current
    one, an event recorded after it, and its outputs (allocated on the side stream) marked as used
    by the current stream, so that their memory is not handed out again while it reads them. On
    the CPU (no streams): the call itself."""
    if device.type != "cuda":
        return call
    side = torch.cuda.Stream(device)

    def run() -> Any:
        compute = torch.cuda.current_stream(device)
        side.wait_stream(compute)
        with torch.cuda.stream(side):
            out = call()
        event = torch.cuda.Event()
        event.record(side)
        for t in tensors_in(out if isinstance(out, tuple) else (out,)):
            t.record_stream(compute)
        return out, event

    return run


def _ll_pairs(args: argparse.Namespace, device: torch.device) -> tuple[Pairs, list[Buffer]]:
    world = dist.get_world_size()
    experts, tokens, hidden, topk = args.experts, args.ll_tokens, args.hidden, args.topk
    g = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16).to(device)
    idx, w = make_routing("random", tokens, experts, topk, world_size=world, generator=g)
    idx, w = idx.to(device), w.to(device)
    hint = Buffer.get_low_latency_rdma_size_hint(tokens, hidden, world, experts)
    buffer, streamed = (
        Buffer(
            dist.group.WORLD, 0, hint, low_latency_mode=True, explicitly_destroy=True, backend=args.backend
        )
        for _ in range(2)
    )
    native = Group(experts, tokens, hidden, mode="ll", max_topk=topk, backend=args.backend)
    deep = buffer.low_latency_dispatch
    combine = buffer.low_latency_combine
    recv, _, handle, _, _ = deep(x, idx, tokens, experts, use_fp8=False)
    recv_w, _, handle_w, _, _ = deep(x, idx, tokens, experts, use_fp8=False, topk_weights=w)
    # async_finish calls run on a Buffer of their own: once a Buffer has used two streams it marks
    # every launch with an event (streams.py), and the other rows are of a Buffer on one stream
    deep_s = streamed.low_latency_dispatch
    recv_s, _, handle_s, _, _ = deep_s(x, idx, tokens, experts, use_fp8=False, topk_weights=w)
    out = native.ll_dispatch(x, idx, w)
    rows, routing = out[0].clone(), out[3]
    y = torch.empty(tokens, hidden, dtype=torch.bfloat16, device=device)
    pairs: Pairs = {
        "ll_dispatch bf16": (
            lambda: deep(x, idx, tokens, experts, use_fp8=False),
            lambda: native.ll_dispatch(x, idx, w),
        ),
        "ll_dispatch fp8": (
            lambda: deep(x, idx, tokens, experts, use_fp8=True),
            lambda: native.ll_dispatch(x, idx, w, use_fp8=True, column_major_scales=True),
        ),
        "ll_dispatch fp8 round_scale": (
            lambda: deep(x, idx, tokens, experts, use_fp8=True, round_scale=True),
            lambda: native.ll_dispatch(x, idx, w, use_fp8=True, column_major_scales=True, round_scale=True),
        ),
        "ll_dispatch fp8 ue8m0": (
            lambda: deep(x, idx, tokens, experts, use_fp8=True, round_scale=True, use_ue8m0=True),
            lambda: native.ll_dispatch(x, idx, w, use_fp8=True, ue8m0=True, column_major_scales=True),
        ),
        "ll_dispatch bf16 weights": (
            lambda: deep(x, idx, tokens, experts, use_fp8=False, topk_weights=w),
            lambda: native.ll_dispatch(x, idx, w),
        ),
        "ll_dispatch bf16, hook": (
            _hooked(lambda: deep(x, idx, tokens, experts, use_fp8=False, return_recv_hook=True)),
            lambda: native.ll_dispatch(x, idx, w, send_only=True).wait(),
        ),
        "ll_dispatch fp8, hook": (
            _hooked(lambda: deep(x, idx, tokens, experts, use_fp8=True, return_recv_hook=True)),
            lambda: native.ll_dispatch(
                x, idx, w, use_fp8=True, send_only=True, column_major_scales=True
            ).wait(),
        ),
        "ll_dispatch bf16, async_finish": (
            lambda: deep_s(x, idx, tokens, experts, use_fp8=False, async_finish=True),
            _overlapped(device, lambda: native.ll_dispatch(x, idx, w)),
        ),
        "ll_dispatch bf16, on the Buffer of async_finish calls": (
            lambda: deep_s(x, idx, tokens, experts, use_fp8=False),
            lambda: native.ll_dispatch(x, idx, w),
        ),
        "ll_combine (dispatch's weights)": (
            lambda: combine(recv_w, idx, w, handle_w),
            lambda: native.ll_combine(rows, routing),
        ),
        "ll_combine (dispatch's weights), out=": (
            lambda: combine(recv_w, idx, w, handle_w, out=y),
            lambda: native.ll_combine(rows, routing, out=y),
        ),
        "ll_combine (dispatch's weights), hook": (
            _hooked(lambda: combine(recv_w, idx, w, handle_w, return_recv_hook=True)),
            lambda: native.ll_combine(rows, routing, send_only=True).wait(),
        ),
        "ll_combine (dispatch's weights), async_finish": (
            lambda: streamed.low_latency_combine(recv_s, idx, w, handle_s, async_finish=True),
            _overlapped(device, lambda: native.ll_combine(rows, routing)),
        ),
        "ll_combine (weights at the combine)": (
            lambda: combine(recv, idx, w, handle),
            lambda: native.ll_combine(rows, routing, topk_weights=w),
        ),
    }
    if hidden % (fp8.BLOCK * 4):
        del pairs["ll_dispatch fp8 ue8m0"]  # packed UE8M0 needs hidden divisible by 512
    return pairs, [buffer, streamed]


def _ht_pairs(args: argparse.Namespace, device: torch.device) -> tuple[Pairs, list[Buffer]]:
    world = dist.get_world_size()
    experts, tokens, hidden, topk = args.experts, args.ht_tokens, args.hidden, args.topk
    g = torch.Generator().manual_seed(100 + dist.get_rank())
    x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16).to(device)
    x_fp8, x_scales = fp8.quantize(x)
    idx, w = make_routing("random", tokens, experts, topk, world_size=world, generator=g)
    idx, w = idx.to(device), w.to(device)
    buffer, streamed = (
        Buffer(
            dist.group.WORLD,
            1 << 30,
            0,
            explicitly_destroy=True,
            backend=args.backend,
            ht_max_tokens_per_rank=tokens,
        )
        for _ in range(2)
    )
    native = Group(experts, tokens, hidden, mode="ht", max_topk=max(topk, 8), backend=args.backend)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    worst = tokens * world
    dispatch = buffer.dispatch
    recv = dispatch(x, **layout, topk_idx=idx, topk_weights=w)
    recv_worst = dispatch(x, **layout, topk_idx=idx, topk_weights=w, num_worst_tokens=worst)
    dispatch((x_fp8, x_scales), **layout, topk_idx=idx, topk_weights=w)
    recv_s = streamed.dispatch(x, **layout, topk_idx=idx, topk_weights=w, num_worst_tokens=worst)
    out = native.ht_dispatch(x, idx, w)
    rows, routing = out.x.clone(), out.handle
    cached = recv_worst[4].routing
    native_cached = partial(recv_worst[4].group.ht_dispatch_cached, x, cached)  # bound before watch()

    pairs: Pairs = {
        "get_dispatch_layout (against its kernel's call)": (
            lambda: buffer.get_dispatch_layout(idx, experts),
            partial(dispatch_layout, idx, experts, world, 1),
        ),
        "dispatch bf16, exact size": (
            lambda: dispatch(x, **layout, topk_idx=idx, topk_weights=w),
            lambda: native.ht_dispatch(x, idx, w),
        ),
        "dispatch bf16, num_worst_tokens": (
            lambda: dispatch(x, **layout, topk_idx=idx, topk_weights=w, num_worst_tokens=worst),
            lambda: native.ht_dispatch(x, idx, w),
        ),
        "dispatch fp8, exact size": (
            lambda: dispatch((x_fp8, x_scales), **layout, topk_idx=idx, topk_weights=w),
            lambda: native.ht_dispatch(x_fp8, idx, w, x_scales),
        ),
        "dispatch fp8, num_worst_tokens": (
            lambda: dispatch(
                (x_fp8, x_scales), **layout, topk_idx=idx, topk_weights=w, num_worst_tokens=worst
            ),
            lambda: native.ht_dispatch(x_fp8, idx, w, x_scales),
        ),
        "dispatch bf16, num_worst_tokens, async_finish": (
            lambda: streamed.dispatch(
                x, **layout, topk_idx=idx, topk_weights=w, num_worst_tokens=worst, async_finish=True
            ),
            _overlapped(device, lambda: native.ht_dispatch(x, idx, w)),
        ),
        "dispatch bf16, cached": (
            lambda: dispatch(x, handle=recv_worst[4]),
            native_cached,
        ),
        "combine (exact rows)": (
            lambda: buffer.combine(recv[0], recv[4]),
            lambda: native.ht_combine(rows, routing),
        ),
        "combine (N rows)": (
            lambda: buffer.combine(recv_worst[0], recv_worst[4]),
            lambda: native.ht_combine(rows, routing),
        ),
        "combine (N rows), async_finish": (
            lambda: streamed.combine(recv_s[0], recv_s[4], async_finish=True),
            _overlapped(device, lambda: native.ht_combine(rows, routing)),
        ),
    }
    return pairs, [buffer, streamed]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    gpu = args.gpu and torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    device = torch.device("cuda", rank) if gpu else torch.device("cpu")
    results: dict[str, Any] = {}
    backends: dict[str, str] = {}
    clock = InnerClock()
    for make in (_ll_pairs, _ht_pairs):
        pairs, buffers = make(args, device)
        pairs = {name: pair for name, pair in pairs.items() if not args.only or args.only in name}
        for buffer in buffers:
            backends.update({str(group.mode): str(group.backend) for group in buffer.groups})
            if args.isolate:
                replay(buffer)
            watch(clock, buffer)
        results.update(_time(pairs, args.iters, args.warmup, args.batch, device, clock))
        for buffer in buffers:
            buffer.destroy()
    if rank == 0:
        where = f"{world} x {torch.cuda.get_device_name(device) if gpu else 'CPU'}"
        per = f"samples of {args.batch} calls back to back" if args.batch > 1 else "calls"
        if args.isolate:
            per += " (--isolate: the shim's Group ops replay a result, Group is the real op)"
        print(f"{where}, backends {backends}; medians of {args.iters} {per}, µs per call")
        print(f"(one clock read costs {clock.read_cost * 1e6:.2f} µs here; shim own is net of it)")
        width = max(len(name) for name in results)
        print(f"{'call':<{width}}  {'shim':>9}  {'Group':>9}  {'shim-Group':>10}  {'shim own':>9}")
        for name, r in results.items():
            print(
                f"{name:<{width}}  {r['shim_us']:9.1f}  {r['native_us']:9.1f}  {r['diff_us']:10.1f}  "
                f"{r['shim_own_us']:9.1f}"
            )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {
                        "world": world,
                        "device": where,
                        "backends": backends,
                        "args": vars(args),
                        "results": results,
                    },
                    f,
                    indent=1,
                )
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--iters", type=int, default=200, help="timed calls of each op (default 200)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument(
        "--batch",
        type=int,
        default=1,
        help="calls back to back per sample (default 1: each call after a barrier; more: warm caches)",
    )
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ll-tokens", type=int, default=64, help="LL tokens per rank (also T)")
    parser.add_argument("--ht-tokens", type=int, default=256, help="HT tokens per rank")
    parser.add_argument("--backend", default="auto", help="ncclep backend of both sides")
    parser.add_argument("--gpu", action="store_true", help="one GPU per process, NCCL")
    parser.add_argument(
        "--isolate",
        action="store_true",
        help="the shim's Group ops return a result computed once: the shim's own host work alone",
    )
    parser.add_argument("--only", default=None, help="only the calls whose name contains this")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    mp.spawn(_worker, args=(args.world, free_port(), args), nprocs=args.world)


if __name__ == "__main__":
    main()
