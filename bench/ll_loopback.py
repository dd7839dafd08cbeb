"""LL kernel time of several ranks on one GPU: a loopback group (``ncclep._C.loopback``: every rank's
window on this device, its peers reached through the same LSA pointers as over NVLink, no NCCL),
each rank's calls on a stream of its own and released together behind a gate kernel. What the
multi-rank protocol (counts from every source, several destinations per token, acknowledgements)
adds to one rank's chain, with no wire in it: the figures are not NVLink's, and the ranks share the
GPU's SMs (``ranks:SMs:nodes``, e.g. ``4:33:1`` is 4 ranks of 33 SMs on one node; ``4:33:2`` emulates
2 nodes of 2).

    python bench/ll_loopback.py                               # kernel µs, slowest rank, medians
    python bench/ll_loopback.py --trace --configs 4:33:1      # per-block stamps of one dispatch

Needs one CUDA GPU and ``CUDA_DEVICE_MAX_CONNECTIONS`` above the largest rank count (each rank's
stream a hardware queue of its own: a rank queued behind a peer that waits for it never starts).
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from ncclep.config import GroupConfig
from ncclep.loopback import loopback_ranks
from ncclep.workloads import make_routing

EXPERTS, MAX_TOKENS, HIDDEN, TOPK = 256, 128, 7168, 8
GATE_CYCLES = 4_000_000  # ~2 ms: every rank's launches are queued before the gate opens
# The dispatch kernel's trace steps (csrc/kernels/ll/ll_params.h, LLTraceStep).
SEND_START, ACKED, ROUTED, SENT, ARRIVED, RECV_START, FLAGS_SEEN, COPIED, LOADED = 0, 1, 2, 3, 4, 6, 7, 8, 9
TRACE_STEPS = 16


@dataclass(frozen=True)
class Layout:
    ranks: int
    sms: int
    nodes: int

    @staticmethod
    def parse(text: str) -> Layout:
        ranks, sms, nodes = (int(v) for v in text.split(":"))
        return Layout(ranks, sms, nodes)


class Loopback:
    """Every rank of one LL group on this GPU, with its inputs."""

    def __init__(self, layout: Layout, tokens: int, use_fp8: bool) -> None:
        self.dev = torch.device("cuda", torch.cuda.current_device())
        self.layout, self.tokens, self.use_fp8 = layout, tokens, use_fp8
        cfg = GroupConfig(EXPERTS, MAX_TOKENS, HIDDEN, "ll", layout.ranks, max_topk=TOPK, num_sms=layout.sms)
        self.ranks = loopback_ranks(cfg, self.dev, layout.nodes)
        self.streams = [torch.cuda.Stream(self.dev) for _ in self.ranks]
        self.gate = torch.cuda.Stream(self.dev)
        g = torch.Generator().manual_seed(1000 * layout.ranks + tokens)
        self.inputs = []
        for _ in self.ranks:
            x = torch.randn(tokens, HIDDEN, generator=g).to(torch.bfloat16).to(self.dev)
            idx, w = make_routing("random", tokens, EXPERTS, TOPK, world_size=layout.ranks, generator=g)
            self.inputs.append((x, idx.to(self.dev), w.to(self.dev)))
        self.expert_out: list[torch.Tensor | None] = [None] * len(self.ranks)

    def step(self, gated: bool, combine: bool = True, traces: Sequence[torch.Tensor] | None = None) -> None:
        """One dispatch (and combine) of every rank, released together when ``gated``."""
        opened = None
        if gated:
            with torch.cuda.stream(self.gate):
                torch.cuda._sleep(GATE_CYCLES)
                opened = torch.cuda.Event()
                opened.record(self.gate)
        outs = []
        for r, rank in enumerate(self.ranks):
            rank.trace = None if traces is None else traces[r]  # read when the kernel is launched
            with torch.cuda.stream(self.streams[r]):
                if opened is not None:
                    self.streams[r].wait_event(opened)
                outs.append(rank.dispatch(*self.inputs[r], self.use_fp8, False))
            rank.trace = None
        for r, rank in enumerate(self.ranks):
            if not combine:
                break
            with torch.cuda.stream(self.streams[r]):
                y = self.expert_out[r]
                if y is None:
                    y = self.expert_out[r] = torch.randn(outs[r].x.shape, device=self.dev).to(torch.bfloat16)
                rank.combine(y, outs[r].handle)
        torch.cuda.synchronize()

    def close(self) -> None:
        for rank in self.ranks:
            rank.comm.close()


def kernel_times(lb: Loopback, iters: int) -> tuple[float, float, float]:
    """Medians over ``iters`` calls of the slowest rank's dispatch and combine kernel µs (profiler),
    and of the spread of the ranks' dispatch starts."""
    for _ in range(10):
        lb.step(False)
    for _ in range(3):
        lb.step(True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            lb.step(True)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    R = lb.layout.ranks
    per_call: dict[str, list[list[Any]]] = {}
    for name in ("llDispatchKernel", "llCombineKernel"):
        found = sorted((e for e in kernels if name in e.name), key=lambda e: e.time_range.start)
        if len(found) != iters * R:
            raise RuntimeError(f"{name}: {len(found)} kernels for {iters} calls of {R} ranks")
        per_call[name] = [found[i * R : (i + 1) * R] for i in range(iters)]
    slowest = [
        statistics.median(max(e.time_range.elapsed_us() for e in call) for call in per_call[name])
        for name in ("llDispatchKernel", "llCombineKernel")
    ]
    skew = statistics.median(
        max(e.time_range.start for e in call) - min(e.time_range.start for e in call)
        for call in per_call["llDispatchKernel"]
    )
    return slowest[0], slowest[1], skew


def _seen(us: torch.Tensor, raw: torch.Tensor, step: int, blocks: torch.Tensor | None = None) -> torch.Tensor:
    """The stamps of ``step`` (µs) of the blocks that reached it (of ``blocks``, if given)."""
    v, reached = us[:, step], raw[:, step] > 0
    if blocks is not None:
        v, reached = v[blocks], reached[blocks]
    return v[reached] if bool(reached.any()) else torch.tensor([float("nan")])


def trace(lb: Loopback, reps: int) -> list[tuple[str, list[float]]]:
    """Per rank, the dispatch's protocol steps in µs from the earliest block of any rank (one
    %globaltimer serves every rank), medians of ``reps`` calls. Steps a block does not reach (a
    sending block that leaves the receive to others) are left out of the medians."""
    for _ in range(10):
        lb.step(False)
    sms = lb.layout.sms
    senders = torch.arange(min(lb.tokens, sms))
    bufs = [torch.zeros(sms, TRACE_STEPS, dtype=torch.int64, device=lb.dev) for _ in lb.ranks]
    rows: dict[str, list[list[float]]] = {}
    for _ in range(reps):
        for b in bufs:
            b.zero_()
        lb.step(True, combine=False, traces=bufs)
        stamps = torch.stack([b.cpu().double() for b in bufs])  # [rank, block, step]
        t0 = stamps[:, :, SEND_START][stamps[:, :, SEND_START] > 0].min()
        for r, raw in enumerate(stamps):
            us = (raw - t0) / 1e3
            copied = _seen(us, raw, COPIED)
            values = {
                "first block started": _seen(us, raw, SEND_START).min(),
                "last block started": _seen(us, raw, SEND_START).max(),
                "senders: token ranked": _seen(us, raw, ROUTED, senders).median(),
                "senders: acks seen": _seen(us, raw, ACKED, senders).median(),
                "senders: token stored": _seen(us, raw, SENT, senders).median(),
                "last sender signalled": _seen(us, raw, ARRIVED, senders).max(),
                "counts block: counted": us[sms - 1, LOADED],
                "counts block: signalled": us[sms - 1, ARRIVED],
                "receive started (median)": _seen(us, raw, RECV_START).median(),
                "counts seen (median)": _seen(us, raw, FLAGS_SEEN).median(),
                "counts seen (last)": _seen(us, raw, FLAGS_SEEN).max(),
                "copies done (median)": copied.median(),
                "copies done (last)": copied.max(),
                "last to copy (block)": torch.where(raw[:, COPIED] > 0, us[:, COPIED], -1e9).argmax(),
            }
            for name, value in values.items():
                rows.setdefault(name, [[] for _ in lb.ranks])[r].append(float(value))
    return [(name, [statistics.median(v) for v in per_rank]) for name, per_rank in rows.items()]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", default="1:132:1,4:33:1", help="ranks:SMs:nodes, comma-separated")
    parser.add_argument("--tokens", default="1,8,32", help="tokens per rank, comma-separated (at most 128)")
    parser.add_argument("--payloads", default="fp8,bf16", help="fp8 and/or bf16")
    parser.add_argument("--iters", type=int, default=40, help="calls timed per case")
    parser.add_argument("--trace", action="store_true", help="per-block stamps of one fused dispatch instead")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    layouts = [Layout.parse(c) for c in args.configs.split(",")]
    connections = int(os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "8"))
    if max(lay.ranks for lay in layouts) >= connections:
        raise SystemExit(f"set CUDA_DEVICE_MAX_CONNECTIONS above the rank count (now {connections})")
    tokens = [int(t) for t in args.tokens.split(",")]
    payloads = args.payloads.split(",")
    if not args.trace:
        head = ("ranks", "nodes", "SMs", "tokens", "payload", "dispatch", "combine", "start spread")
        print(" ".join(f"{h:>8}" for h in head) + f"   µs: slowest rank's kernel, median of {args.iters}")
    for lay, n, payload in ((lay, n, p) for lay in layouts for n in tokens for p in payloads):
        lb = Loopback(lay, n, payload == "fp8")
        try:
            if args.trace:
                what = f"{lay.ranks} ranks of {lay.sms} SMs, {lay.nodes} node(s), {n} token(s), {payload}"
                print(f"--- {what}: µs from the earliest block of any rank, median of 7 calls")
                print(f"{'step':<26}" + "".join(f"{'rank ' + str(r):>9}" for r in range(lay.ranks)))
                for name, per_rank in trace(lb, 7):
                    print(f"{name:<26}" + "".join(f"{v:9.2f}" for v in per_rank))
            else:
                cells = (lay.ranks, lay.nodes, lay.sms, n, payload, *kernel_times(lb, args.iters))
                print(" ".join(f"{c:8.1f}" if isinstance(c, float) else f"{c!s:>8}" for c in cells))
        finally:
            lb.close()


if __name__ == "__main__":
    main()
