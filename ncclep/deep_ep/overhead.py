"""What the DeepEP shim adds to each call: the shim's ops against the ncclep Group ops they run on.

    python -m ncclep.deep_ep.overhead                    # 2 gloo processes, reference backend
    python -m ncclep.deep_ep.overhead --world 4 --iters 400 --json overhead.json

Each process makes one :class:`ncclep.deep_ep.Buffer` and ncclep groups of the same sizes, then
calls each shim op and the Group op it stands for in turn, ``--iters`` times each. For every shim
call it also times what ran inside the ncclep Group ops the shim called (their methods, and the
receive halves of ``send_only`` calls); the rest is the shim's own host time: argument handling,
the layouts DeepEP's outputs need, and the collectives the shim adds (the weight exchange of an LL
combine without dispatch-time weights, the count gather and host read of an exact-size HT
dispatch). Rank 0 prints medians: the shim call, the Group call, and the shim's own time.

On the reference backend (CPU, gloo) a Group op runs to completion, transfer included, so the
end-to-end medians are noisy on a busy machine; the shim's own time is not (it excludes the Group
op). Every call starts after a barrier (and, on GPUs, a device synchronisation), so that waiting
for a late peer is not counted as the shim's. On GPUs (``--gpu``: one per process, NCCL) the
calls only launch: the times are host times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..bootstrap import free_port
from ..group import Group, Pending
from ..workloads import make_routing
from .buffer import Buffer

Call = Callable[[], Any]


def _sync(device: torch.device) -> None:
    """Finish the device's work and line the ranks up, so that no call starts by waiting for a
    peer that is still in the previous one (that wait would be counted as the shim's own)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


class InnerClock:
    """Seconds spent inside the ncclep Group ops (and ``Pending.wait``) while it is armed."""

    def __init__(self) -> None:
        self.armed = False
        self.seconds = 0.0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.armed:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


GROUP_OPS = ("ll_dispatch", "ll_combine", "ht_dispatch", "ht_combine")


def watch(clock: InnerClock, buffer: Buffer) -> None:
    """Time the Group ops of ``buffer``'s groups (made by the warm-up calls) and every receive half."""
    for group in buffer.groups:
        for name in GROUP_OPS:
            setattr(group, name, clock.wrap(getattr(group, name)))
    if not getattr(Pending.wait, "_timed", False):
        timed_wait = clock.wrap(Pending.wait)
        timed_wait._timed = True  # type: ignore[attr-defined]
        Pending.wait = timed_wait  # type: ignore[method-assign]
        Pending.__call__ = timed_wait  # type: ignore[method-assign]


def _median_us(values: list[float]) -> float:
    return statistics.median(values) * 1e6


def _time(
    pairs: dict[str, tuple[Call, Call]], iters: int, warmup: int, device: torch.device, clock: InnerClock
) -> dict[str, Any]:
    """Medians of each (shim, native) call and of the shim's own time, interleaved so that drift
    hits both alike."""
    shim: dict[str, list[float]] = {name: [] for name in pairs}
    own: dict[str, list[float]] = {name: [] for name in pairs}
    native: dict[str, list[float]] = {name: [] for name in pairs}
    for i in range(warmup + iters):
        for name, (shim_call, native_call) in pairs.items():
            _sync(device)
            clock.seconds, clock.armed = 0.0, True
            start = time.perf_counter()
            shim_call()
            elapsed = time.perf_counter() - start
            clock.armed = False
            inner = clock.seconds
            _sync(device)
            start = time.perf_counter()
            native_call()
            native_elapsed = time.perf_counter() - start
            if i >= warmup:
                shim[name].append(elapsed)
                own[name].append(elapsed - inner)
                native[name].append(native_elapsed)
    return {
        name: {
            "shim_us": _median_us(shim[name]),
            "native_us": _median_us(native[name]),
            "shim_own_us": _median_us(own[name]),
        }
        for name in pairs
    }


def _ll_pairs(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, tuple[Call, Call]], Buffer]:
    world = dist.get_world_size()
    experts, tokens, hidden, topk = args.experts, args.ll_tokens, args.hidden, args.topk
    g = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16).to(device)
    idx, w = make_routing("random", tokens, experts, topk, world_size=world, generator=g)
    idx, w = idx.to(device), w.to(device)
    hint = Buffer.get_low_latency_rdma_size_hint(tokens, hidden, world, experts)
    buffer = Buffer(
        dist.group.WORLD, 0, hint, low_latency_mode=True, explicitly_destroy=True, backend=args.backend
    )
    native = Group(experts, tokens, hidden, mode="ll", max_topk=topk, backend=args.backend)
    recv, _, handle, _, _ = buffer.low_latency_dispatch(x, idx, tokens, experts, use_fp8=False)
    recv_w, _, handle_w, _, _ = buffer.low_latency_dispatch(
        x, idx, tokens, experts, use_fp8=False, topk_weights=w
    )
    out = native.ll_dispatch(x, idx, w)
    rows, routing = out[0].clone(), out[3]
    pairs: dict[str, tuple[Call, Call]] = {
        "ll_dispatch bf16": (
            lambda: buffer.low_latency_dispatch(x, idx, tokens, experts, use_fp8=False),
            lambda: native.ll_dispatch(x, idx, w),
        ),
        "ll_dispatch fp8": (
            lambda: buffer.low_latency_dispatch(x, idx, tokens, experts, use_fp8=True),
            lambda: native.ll_dispatch(x, idx, w, use_fp8=True),
        ),
        "ll_dispatch bf16, hook": (
            lambda: buffer.low_latency_dispatch(
                x, idx, tokens, experts, use_fp8=False, return_recv_hook=True
            )[4](),
            lambda: native.ll_dispatch(x, idx, w, send_only=True).wait(),
        ),
        "ll_combine (weights exchanged)": (
            lambda: buffer.low_latency_combine(recv, idx, w, handle),
            lambda: native.ll_combine(rows, routing),
        ),
        "ll_combine (dispatch's weights)": (
            lambda: buffer.low_latency_combine(recv_w, idx, w, handle_w),
            lambda: native.ll_combine(rows, routing),
        ),
    }
    return pairs, buffer


def _ht_pairs(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, tuple[Call, Call]], Buffer]:
    world = dist.get_world_size()
    experts, tokens, hidden, topk = args.experts, args.ht_tokens, args.hidden, args.topk
    g = torch.Generator().manual_seed(100 + dist.get_rank())
    x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16).to(device)
    idx, w = make_routing("random", tokens, experts, topk, world_size=world, generator=g)
    idx, w = idx.to(device), w.to(device)
    buffer = Buffer(
        dist.group.WORLD,
        1 << 30,
        0,
        explicitly_destroy=True,
        backend=args.backend,
        ht_max_tokens_per_rank=tokens,
    )
    native = Group(experts, tokens, hidden, mode="ht", max_topk=max(topk, 8), backend=args.backend)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    worst = tokens * world
    recv = buffer.dispatch(x, **layout, topk_idx=idx, topk_weights=w)
    recv_worst = buffer.dispatch(x, **layout, topk_idx=idx, topk_weights=w, num_worst_tokens=worst)
    out = native.ht_dispatch(x, idx, w)
    rows, routing = out.x.clone(), out.handle
    pairs: dict[str, tuple[Call, Call]] = {
        "get_dispatch_layout (no native op)": (
            lambda: buffer.get_dispatch_layout(idx, experts),
            lambda: None,
        ),
        "dispatch, exact size": (
            lambda: buffer.dispatch(x, **layout, topk_idx=idx, topk_weights=w),
            lambda: native.ht_dispatch(x, idx, w),
        ),
        "dispatch, num_worst_tokens": (
            lambda: buffer.dispatch(x, **layout, topk_idx=idx, topk_weights=w, num_worst_tokens=worst),
            lambda: native.ht_dispatch(x, idx, w),
        ),
        "combine (rows copied to N)": (
            lambda: buffer.combine(recv[0], recv[4]),
            lambda: native.ht_combine(rows, routing),
        ),
        "combine (N rows, no copy)": (
            lambda: buffer.combine(recv_worst[0], recv_worst[4]),
            lambda: native.ht_combine(rows, routing),
        ),
    }
    return pairs, buffer


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
    results = {}
    clock = InnerClock()
    for make in (_ll_pairs, _ht_pairs):
        pairs, buffer = make(args, device)
        watch(clock, buffer)
        results.update(_time(pairs, args.iters, args.warmup, device, clock))
        buffer.destroy()
    if rank == 0:
        width = max(len(name) for name in results)
        print(f"{'call':<{width}}  {'shim µs':>9}  {'Group µs':>9}  {'shim own µs':>11}")
        for name, r in results.items():
            print(f"{name:<{width}}  {r['shim_us']:9.1f}  {r['native_us']:9.1f}  {r['shim_own_us']:11.1f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"world": world, "args": vars(args), "results": results}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--iters", type=int, default=200, help="timed calls of each op (default 200)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ll-tokens", type=int, default=64, help="LL tokens per rank (also T)")
    parser.add_argument("--ht-tokens", type=int, default=256, help="HT tokens per rank")
    parser.add_argument("--backend", default="auto", help="ncclep backend of both sides")
    parser.add_argument("--gpu", action="store_true", help="one GPU per process, NCCL")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    mp.spawn(_worker, args=(args.world, free_port(), args), nprocs=args.world)


if __name__ == "__main__":
    main()
