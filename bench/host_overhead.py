"""Host overhead of the eager Group methods: the Python around the backend call, nothing else.

Issue "LL at the speed of the wire", item 2: an eager dispatch + combine pair should cost at most
60 µs of host CPU time. This script measures the share of it spent in ncclep's Python (argument
checks, the eager test, handle stamping, the method glue), without a GPU and without the backend.

It opens, on one CPU process (gloo, world size 1, ``backend="reference"``), an LL group and an HT
group, and replaces each group's backend with a stub whose ``dispatch`` and ``combine`` return
outputs made once beforehand (shaped by :mod:`ncclep.outputs`, so the methods see exactly what a
backend would give them). Each call is then timed on its own with ``time.perf_counter_ns`` after
``--warmup`` calls; the methods take turns for ``--rounds`` rounds of ``--iters`` calls so that a
slow patch of the machine touches all of them. Reported per method: the median over every call
(µs) and the lowest and highest median of a round, which show the machine's noise.

Workloads (the brief's sizes): LL 256 experts, 128 tokens, hidden 7168, top-8, bf16; HT 256
experts, 4096 tokens, hidden 7168, top-8, bf16, flat layout, with topk_weights. ``pair`` is a
dispatch followed by the combine of its output, timed as one.

    PYTHONPATH=$PWD python bench/host_overhead.py
    PYTHONPATH=$PWD python bench/host_overhead.py --iters 2000 --rounds 10 --json host.json

To compare two trees, run this file against each (``PYTHONPATH=/other/tree python
bench/host_overhead.py``), alternating, on the same machine.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

import ncclep
from ncclep import outputs

EXPERTS, TOPK, HIDDEN = 256, 8, 7168
LL_TOKENS, HT_TOKENS = 128, 4096


class StubBackend:
    """Stands in for a group's backend: every call returns the outputs it was given."""

    def __init__(self, dispatched: Any, combined: Any) -> None:
        self.dispatched = dispatched
        self.combined = combined

    def dispatch(self, *_args: Any) -> Any:
        return self.dispatched

    def combine(self, *_args: Any) -> Any:
        return self.combined


def routing(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k distinct expert ids per token and their float32 weights."""
    g = torch.Generator().manual_seed(tokens)
    idx = torch.rand(tokens, EXPERTS, generator=g).argsort(dim=1)[:, :TOPK].contiguous()
    return idx, torch.rand(tokens, TOPK, generator=g)


def ll_calls(device: torch.device) -> dict[str, Callable[[], object]]:
    group = ncclep.Group(EXPERTS, LL_TOKENS, HIDDEN, mode="ll", max_topk=TOPK, backend="reference")
    new = outputs.allocator(device)
    dispatched = outputs.ll_dispatch(group.config, LL_TOKENS, HIDDEN, False, False, new)
    combined = outputs.combine(LL_TOKENS, HIDDEN, new)
    group._backend = StubBackend(dispatched, combined)

    x = torch.empty(LL_TOKENS, HIDDEN, dtype=torch.bfloat16, device=device)
    idx, weights = routing(LL_TOKENS)
    expert_out = torch.empty_like(dispatched.x)
    handle = group.ll_dispatch(x, idx, weights).handle  # type: ignore[union-attr]

    def pair() -> object:
        out = group.ll_dispatch(x, idx, weights)
        return group.ll_combine(expert_out, out.handle)  # type: ignore[union-attr]

    return {
        "ll_dispatch": lambda: group.ll_dispatch(x, idx, weights),
        "ll_combine": lambda: group.ll_combine(expert_out, handle),
        "ll_pair": pair,
    }


def ht_calls(device: torch.device) -> dict[str, Callable[[], object]]:
    group = ncclep.Group(EXPERTS, HT_TOKENS, HIDDEN, mode="ht", max_topk=TOPK, backend="reference")
    new = outputs.allocator(device)
    dispatched = outputs.ht_dispatch(
        group.config, HT_TOKENS, HIDDEN, torch.bfloat16, None, TOPK, torch.int64, True, "flat", 1, new
    )
    combined = outputs.ht_combine(HT_TOKENS, HIDDEN, TOPK, True, new)
    group._backend = StubBackend(dispatched, combined)

    x = torch.empty(HT_TOKENS, HIDDEN, dtype=torch.bfloat16, device=device)
    idx, weights = routing(HT_TOKENS)
    expert_x = torch.empty_like(dispatched.x)
    expert_weights = torch.empty_like(dispatched.topk_weights)
    handle = group.ht_dispatch(x, idx, weights).handle  # type: ignore[union-attr]

    def pair() -> object:
        out = group.ht_dispatch(x, idx, weights)
        return group.ht_combine(expert_x, out.handle, expert_weights)  # type: ignore[union-attr]

    return {
        "ht_dispatch": lambda: group.ht_dispatch(x, idx, weights),
        "ht_combine": lambda: group.ht_combine(expert_x, handle, expert_weights),
        "ht_pair": pair,
    }


def time_calls(call: Callable[[], object], iters: int) -> list[int]:
    """Nanoseconds of each of ``iters`` calls."""
    clock = time.perf_counter_ns
    samples = []
    for _ in range(iters):
        start = clock()
        call()
        samples.append(clock() - start)
    return samples


def measure(calls: dict[str, Callable[[], object]], warmup: int, iters: int, rounds: int) -> dict[str, Any]:
    for call in calls.values():
        time_calls(call, warmup)
    samples: dict[str, list[int]] = {name: [] for name in calls}
    round_medians: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            timed = time_calls(call, iters)
            samples[name] += timed
            round_medians[name].append(statistics.median(timed) / 1e3)
    return {
        name: {
            "median_us": statistics.median(samples[name]) / 1e3,
            "round_median_min_us": min(round_medians[name]),
            "round_median_max_us": max(round_medians[name]),
            "calls": len(samples[name]),
        }
        for name in calls
    }


def init_process_group() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=1000, help="calls per method per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds in which the methods take turns")
    parser.add_argument("--warmup", type=int, default=200, help="untimed calls per method first")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    init_process_group()
    device = torch.device("cpu")
    calls = {**ll_calls(device), **ht_calls(device)}
    results = measure(calls, args.warmup, args.iters, args.rounds)
    dist.destroy_process_group()

    print(f"ncclep from {ncclep.__file__}")
    print(f"{'method':<12} {'median µs':>10} {'round medians µs':>20}")
    for name, r in results.items():
        spread = f"{r['round_median_min_us']:.2f} .. {r['round_median_max_us']:.2f}"
        print(f"{name:<12} {r['median_us']:>10.2f} {spread:>20}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ncclep": ncclep.__file__, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
