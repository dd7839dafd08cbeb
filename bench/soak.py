"""Soak (issue 13, item 6): many LL and HT dispatch/combine pairs with random token counts and
routing, CUDA-graph replays interleaved, checked against the reference backend as it goes.

Started by itself it spawns one process per visible GPU (two CPU processes on gloo where there is
none); under ``torchrun`` or ``mpirun`` it uses their ranks (``ncclep.launch``). Each rank opens an
LL and an HT group on the backend under test (the CUDA kernels on GPUs, the reference backend on
CPU processes, where the run checks the soak itself rather than kernels) and a reference group of
each shape, then runs ``--ll-iters`` LL pairs and ``--ht-iters`` HT pairs:

* every call: each rank's token count at random in 0..max (0, 1 and max included, different per
  rank), its routing (random / uniform / skewed / hot onto a random rank, random masked entries,
  now and then whole tokens routed nowhere), and, the same on every rank, the payload (LL bf16,
  fp8, fp8 with UE8M0 scales; HT bf16, fp8 with fp32 or UE8M0 scales), top-k, hidden size and, for
  HT, the layout (flat, expert_major with alignment 1, 16 or 128), topk_weights or none, int32 or
  int64 ids. Stand-in experts scale each received row by a factor of its expert;
* every ``--graph-every``-th call replays instead a dispatch -> experts -> combine step captured
  once per mode in a CUDA graph at ``max`` tokens (LL fp8, HT bf16 expert_major/16), with fresh
  inputs copied into its static tensors (a random tail of tokens routed nowhere, so the live token
  count varies too). On CPU processes the step runs eagerly with the same static tensors;
* every ``--check-every``-th call (and the last) runs the reference group on the same inputs:
  dispatch bit-exact (counts, every handle tensor, payload and scales on the rows in use), combine
  within 1e-2 relative error (combined HT weights 1e-5), as the GPU tests compare; graph replays
  are checked at the same rate (their dispatch outputs and combine output).

Reported: per mode, iterations (eager, replays), wall time, checks, mismatches (the first few
described), the error each group's ``check()`` raised at the end, and the largest combine error
per window of ``--window`` iterations. Drift is a later half of the windows whose median largest
error exceeds twice the earlier half's (and 1e-3). A mismatch, a device error or drift fails the
run (exit status 1). Nothing here asserts a speed. ``--self-test-corrupt`` corrupts the outputs
at the first checks of each mode (a dispatch payload, a combine output, a graph replay's combine
output): the run must report them and fail.

    PYTHONPATH=$PWD python bench/soak.py                 # every GPU: 10,000 LL + 2,000 HT pairs
    PYTHONPATH=$PWD python bench/soak.py --ll-iters 500 --ht-iters 100 --json soak.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import ncclep
from ncclep import _native, fp8
from ncclep.bench.timing import capture_graph
from ncclep.launch import launch
from ncclep.testing import (
    COMBINE_TOLERANCE,
    ht_dispatch_difference,
    ll_dispatch_difference,
    relative_error,
)
from ncclep.workloads import ROUTINGS, make_routing

WEIGHTS_TOLERANCE = 1e-5
DRIFT_FACTOR, DRIFT_FLOOR = 2.0, 1e-3
FIRST_MISMATCHES = 5
# (experts, max tokens per rank, hidden, top-k): on GPUs the benchmark's LL and HT shapes; on CPU
# processes small ones (the reference backend moves rows with gloo).
SIZES = {
    ("ll", True): (256, 128, 7168, 8),
    ("ht", True): (256, 4096, 7168, 8),
    ("ll", False): (24, 16, 256, 4),
    ("ht", False): (24, 64, 256, 4),
}
LL_PAYLOADS = ("bf16", "fp8", "ue8m0")
HT_PAYLOADS = ("bf16", "fp8", "ue8m0")
HT_LAYOUTS = (("flat", 1), ("expert_major", 1), ("expert_major", 16), ("expert_major", 128))
GRAPH = {"ll": "fp8", "ht": ("expert_major", 16)}


# ----------------------------------------------------------------------------- records


@dataclass
class Window:
    start: int
    checks: int = 0
    max_error: float = 0.0
    graph_checks: int = 0
    graph_max_error: float = 0.0


@dataclass
class Stats:
    """One rank's record of one mode."""

    mode: str
    window_size: int
    iterations: int = 0
    eager: int = 0
    replays: int = 0
    checks: int = 0
    graph_checks: int = 0
    mismatches: int = 0
    first: list[str] = field(default_factory=list)
    max_error: float = 0.0
    wall_s: float = 0.0
    windows: list[Window] = field(default_factory=list)
    device_error: str | None = None

    def window(self, i: int, size: int) -> Window:
        k = i // size
        while len(self.windows) <= k:
            self.windows.append(Window(len(self.windows) * size))
        return self.windows[k]

    def record(self, i: int, size: int, graph: bool, error: float, problem: str | None, rank: int) -> None:
        w = self.window(i, size)
        if math.isnan(error):
            error = math.inf
        if graph:
            self.graph_checks += 1
            w.graph_checks += 1
            w.graph_max_error = max(w.graph_max_error, error)
        else:
            self.checks += 1
            w.checks += 1
            w.max_error = max(w.max_error, error)
        self.max_error = max(self.max_error, error)
        if problem is not None:
            self.mismatches += 1
            if len(self.first) < FIRST_MISMATCHES:
                self.first.append(
                    f"{self.mode} {'graph replay' if graph else 'call'} {i} rank {rank}: {problem}"
                )


# ----------------------------------------------------------------------------- comparisons


def combine_problem(error: float, what: str = "combine") -> str | None:
    return None if error <= COMBINE_TOLERANCE else f"{what} relative error {error:.3g} > {COMBINE_TOLERANCE}"


# ----------------------------------------------------------------------------- the soak of one mode


class ModeSoak:
    """One mode's groups, inputs, calls and checks on this rank."""

    def __init__(self, mode: str, args: argparse.Namespace, pg: Any, device: torch.device) -> None:
        self.mode, self.args, self.pg, self.device = mode, args, pg, device
        self.rank, self.world = dist.get_rank(pg), dist.get_world_size(pg)
        self.experts, self.tokens, self.hidden, self.topk = getattr(args, f"{mode}_size")
        self.iters = getattr(args, f"{mode}_iters")
        self.window_size = args.window or max(1, self.iters // 10)
        self.graphs = device.type == "cuda"
        sizes = (self.experts, self.tokens, self.hidden)
        self.dut = ncclep.Group(
            *sizes,
            mode=mode,
            process_group=pg,
            max_topk=self.topk,
            backend=args.backend_resolved,
            timeout_s=args.timeout,
        )
        self.ref = ncclep.Group(*sizes, mode=mode, process_group=pg, max_topk=self.topk, backend="reference")
        # Choices every rank makes alike (payload, top-k, hidden, layout), and this rank's own.
        self.shared = random.Random(args.seed * 7919 + (0 if mode == "ll" else 1))
        self.local = random.Random(args.seed * 1_000_003 + self.rank * 101 + (0 if mode == "ll" else 1))
        self.gen = torch.Generator(device=device).manual_seed(
            args.seed * 7_000_003 + self.rank * 13 + len(mode)
        )
        local_experts = self.experts // self.world
        self.scale = torch.linspace(0.5, 1.5, local_experts, device=device).to(torch.bfloat16)
        self.topks = sorted({self.topk, max(1, self.topk // 2), 1}, reverse=True)
        smaller = max(fp8.BLOCK, (self.hidden // 2) // fp8.BLOCK * fp8.BLOCK)
        self.hiddens = [self.hidden] if smaller >= self.hidden else [self.hidden, smaller]
        self.stats = Stats(mode, self.window_size)
        self.corrupt = {"dispatch": 0, "combine": 1, "graph": 0} if args.self_test_corrupt else {}

    # -- inputs

    def _token_count(self) -> int:
        r = self.local.random()
        if r < 0.1:
            return 0
        if r < 0.2:
            return self.tokens
        if r < 0.3:
            return 1
        return self.local.randint(0, self.tokens)

    def _routing(
        self, tokens: int, topk: int, mask_tail: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, str]:
        """(topk_idx, topk_weights, a note for the mismatch report)."""
        kinds = [k for k in ROUTINGS if k != "hot" or topk <= self.experts // self.world]
        kind = self.local.choice(kinds)
        masked = self.local.randint(0, tokens * topk // 8) if tokens else 0
        idx, w = make_routing(
            kind,
            tokens,
            self.experts,
            topk,
            world_size=self.world,
            generator=self.gen,
            masked=masked,
            hot_rank=self.local.randrange(self.world),
        )
        nowhere, note = None, f"{kind} B={tokens}"
        if mask_tail:  # graph replays: a fixed shape, a random number of live tokens
            live = self._token_count()
            nowhere = torch.arange(tokens, device=self.device) >= live
            note += f" ({live} live)"
        elif tokens and self.local.random() < 0.2:
            nowhere = torch.rand(tokens, generator=self.gen, device=self.device) < 0.1
        if nowhere is not None:
            idx = torch.where(nowhere.unsqueeze(1), -1, idx)
            w = torch.where(nowhere.unsqueeze(1), 0.0, w)
        return idx, w, note

    def _x(self, tokens: int, hidden: int) -> torch.Tensor:
        """bf16 rows of varied magnitude, no zeros."""
        g, dev = self.gen, self.device
        scale = torch.rand(tokens, 1, generator=g, device=dev) * 4 + 0.25
        x = torch.randn(tokens, hidden, generator=g, device=dev) * scale
        return torch.where(x == 0, 0.5, x).to(torch.bfloat16)

    def inputs(self, graph: bool) -> dict[str, Any]:
        """This call's inputs: keyword arguments of the dispatch, and ``meta`` (what was chosen)."""
        if graph:
            topk, hidden, tokens = self.topk, self.hidden, self.tokens
        else:
            topk = self.shared.choice([self.topk, self.topk, *self.topks])
            hidden = self.shared.choice([self.hidden, self.hidden, *self.hiddens])
            tokens = self._token_count()
        idx, w, note = self._routing(tokens, topk, mask_tail=graph)
        x = self._x(tokens, hidden)
        if self.mode == "ll":
            payload = GRAPH["ll"] if graph else self.shared.choice(LL_PAYLOADS)
            call = {"x": x, "topk_idx": idx, "topk_weights": w}
            opts = {"use_fp8": payload != "bf16", "ue8m0": payload == "ue8m0"}
            return {"call": call, "opts": opts, "meta": f"{payload} k={topk} h={hidden} {note}"}
        if graph:
            payload, (layout, alignment), with_weights, int32 = "bf16", GRAPH["ht"], True, False
        else:
            payload = self.shared.choice(HT_PAYLOADS)
            layout, alignment = self.shared.choice(HT_LAYOUTS)
            with_weights = self.shared.random() < 0.85
            int32 = self.shared.random() < 0.3
        scales = None
        if payload != "bf16":
            x, scales = fp8.quantize(x, ue8m0=payload == "ue8m0")
        call = {
            "x": x,
            "x_scales": scales,
            "topk_idx": idx.to(torch.int32) if int32 else idx,
            "topk_weights": w if with_weights else None,
        }
        meta = f"{payload} {layout}/{alignment} k={topk} h={hidden} {note}"
        return {"call": call, "opts": {"layout": layout, "alignment": alignment}, "meta": meta}

    # -- ops

    def expert_rows(self, out: Any) -> torch.Tensor:
        """Stand-in experts: each row times a factor of its (first) local expert, in bf16."""
        if self.mode == "ll":
            return out.x.to(torch.bfloat16) * self.scale.view(-1, 1, 1)
        first = out.topk_idx.max(dim=1).values.clamp_min(0).long()
        return out.x.to(torch.bfloat16) * self.scale[first].unsqueeze(1)

    def pair(self, group: ncclep.Group, inp: dict[str, Any]) -> tuple[Any, torch.Tensor]:
        """dispatch -> experts -> combine on ``group``: (dispatch outputs, combine output)."""
        if self.mode == "ll":
            d = group.ll_dispatch(**inp["call"], **inp["opts"])
            return d, group.ll_combine(self.expert_rows(d), d.handle)
        d = group.ht_dispatch(**inp["call"], **inp["opts"])
        return d, group.ht_combine(self.expert_rows(d), d.handle)[0]

    def _corrupt_now(self, what: str, count: int) -> bool:
        return self.corrupt.get(what) == count

    def eager(self, i: int, check: bool) -> None:
        inp = self.inputs(graph=False)
        if not check:
            self.pair(self.dut, inp)
            return
        # Checked call: the reference dispatches the same inputs, both combine the same rows.
        compare = ll_dispatch_difference if self.mode == "ll" else ht_dispatch_difference
        if self.mode == "ll":
            a = self.dut.ll_dispatch(**inp["call"], **inp["opts"])
            b = self.ref.ll_dispatch(**inp["call"], **inp["opts"])
        else:
            a = self.dut.ht_dispatch(**inp["call"], **inp["opts"])
            b = self.ref.ht_dispatch(**inp["call"], **inp["opts"])
        if self._corrupt_now("dispatch", self.stats.checks):
            _corrupt_dispatch(a, b)
        problem = compare(a, b)
        y = self.expert_rows(a)
        if self.mode == "ll":
            out_a, out_b = self.dut.ll_combine(y, a.handle), self.ref.ll_combine(y, b.handle)
            w_err = 0.0
        else:  # HT combine also sums per-row weights (as a backward pass does)
            cw = torch.rand(a.x.shape[0], a.topk_idx.shape[1], generator=self.gen, device=self.device)
            out_a, w_a = self.dut.ht_combine(y, a.handle, topk_weights=cw)
            out_b, w_b = self.ref.ht_combine(y, b.handle, topk_weights=cw)
            w_err = relative_error(w_a, w_b) if w_a is not None and w_b is not None else math.inf
        if self._corrupt_now("combine", self.stats.checks):
            out_a = out_a * 1.5 + 1.0
        error = relative_error(out_a, out_b)
        if problem is None:
            problem = combine_problem(error)
        if problem is None and not w_err <= WEIGHTS_TOLERANCE:
            problem = f"combined weights relative error {w_err:.3g} > {WEIGHTS_TOLERANCE}"
        if problem is not None:
            problem = f"{inp['meta']}: {problem}"
        self.stats.record(i, self.window_size, False, error, problem, self.rank)

    # -- graph

    def capture(self) -> None:
        """The dispatch -> experts -> combine step at ``max`` tokens, captured once (GPUs)."""
        inp = self.inputs(graph=True)
        self.static = inp

        def step() -> tuple[Any, torch.Tensor]:
            return self.pair(self.dut, self.static)

        if self.graphs:
            self.graph, self.graph_out = capture_graph(step, self.device)
        else:
            self.graph, self.graph_out = None, None
        self.step = step

    def replay(self, i: int, check: bool) -> None:
        fresh = self.inputs(graph=True)
        for name, t in self.static["call"].items():
            if t is not None:
                t.copy_(fresh["call"][name])
        if self.graph is not None:
            self.graph.replay()
            d, out = self.graph_out
        else:  # CPU processes: the same step, eagerly, on the same static tensors
            d, out = self.step()
        if not check:
            return
        compare = ll_dispatch_difference if self.mode == "ll" else ht_dispatch_difference
        b, expected = self.pair(self.ref, fresh)
        problem = compare(d, b)
        if self._corrupt_now("graph", self.stats.graph_checks):
            out = out * 1.5 + 1.0
        error = relative_error(out, expected)
        if problem is None:
            problem = combine_problem(error)
        if problem is not None:
            problem = f"{fresh['meta']}: {problem}"
        self.stats.record(i, self.window_size, True, error, problem, self.rank)

    # -- the loop

    def prepare(self) -> None:
        """Untimed: one pair on each group (the first call of an op pays one-time set-up), and
        the graph capture."""
        warm = self.inputs(graph=True)
        self.pair(self.dut, warm)
        self.pair(self.ref, warm)
        if self.args.graph_every:
            self.capture()
        sync(self.device)

    def run(self, say: Any) -> Stats:
        args, st = self.args, self.stats
        graph_every = args.graph_every
        per_replay_check = max(1, args.check_every // graph_every) if graph_every else 0
        dist.barrier(group=self.pg)
        start = time.perf_counter()
        for i in range(self.iters):
            last = i == self.iters - 1
            try:
                if graph_every and i % graph_every == graph_every - 1:
                    self.replay(i, st.replays % per_replay_check == 0 or last)
                    st.replays += 1
                else:
                    self.eager(i, i % args.check_every == 0 or last)
                    st.eager += 1
            except Exception:
                print(f"[rank {self.rank}] {self.mode} iteration {i} raised", file=sys.stderr, flush=True)
                raise
            st.iterations += 1
            if (i + 1) % self.window_size == 0 or last:
                w = st.window(i, self.window_size)
                worst = max(w.max_error, w.graph_max_error)
                say(
                    f"{self.mode} {i + 1:>6}/{self.iters}  {time.perf_counter() - start:7.1f} s  "
                    f"checks {st.checks + st.graph_checks}  window max error {worst:.2e}  "
                    f"mismatches {st.mismatches} (rank 0)"
                )
        sync(self.device)
        dist.barrier(group=self.pg)
        st.wall_s = time.perf_counter() - start
        try:
            self.dut.check()
        except Exception as exc:  # every error a kernel reported, named
            st.device_error = f"{type(exc).__name__}: {exc}"
        return st

    def close(self) -> None:
        self.dut.close()
        self.ref.close()


def _corrupt_dispatch(a: Any, b: Any) -> None:
    """Self-test: flip a bit of one row in use of ``a`` (else one count)."""
    if isinstance(a, ncclep.LLDispatchOutput):
        counts = b.expert_counts.tolist()
        for e, n in enumerate(counts):
            if n:
                a.x[e, n - 1].view(torch.uint8)[0] ^= 1
                return
        a.expert_counts[0] += 1
        return
    rows = (b.handle.recv_slot >= 0).nonzero().flatten().tolist()
    if rows:
        a.x[rows[-1]].view(torch.uint8)[0] ^= 1
    else:
        a.expert_counts[0] += 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- summary


def drift(windows: list[float]) -> tuple[bool, str]:
    """Whether the largest errors trend upward: the median of the later half of the windows'
    maxima above twice the earlier half's (and above 1e-3). Medians, so that one window's unlucky
    call (or a self-test's corrupted one) is no trend."""
    if len(windows) < 2:
        return False, "too few windows to tell"
    half = len(windows) // 2
    early, late = statistics.median(windows[:half]), statistics.median(windows[half:])
    bound = max(DRIFT_FACTOR * early, DRIFT_FLOOR)
    if late > bound:
        return True, f"DRIFT: later windows' median max {late:.2e} > {bound:.2e} (earlier {early:.2e})"
    return False, f"none (median window max {early:.2e} earlier, {late:.2e} later; bound {bound:.2e})"


def merge(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Every rank's record of one mode into one: sums, maxima, per-window maxima."""
    first = [m for r in per_rank for m in r["first"]]
    windows = []
    for k in range(max(len(r["windows"]) for r in per_rank)):
        ws = [r["windows"][k] for r in per_rank if k < len(r["windows"])]
        windows.append(
            {
                "start": ws[0]["start"],
                "checks": ws[0]["checks"],
                "graph_checks": ws[0]["graph_checks"],
                "max_error": max(w["max_error"] for w in ws),
                "graph_max_error": max(w["graph_max_error"] for w in ws),
            }
        )
    worst = [max(w["max_error"], w["graph_max_error"]) for w in windows if w["checks"] + w["graph_checks"]]
    drifted, drift_note = drift(worst)
    r0 = per_rank[0]
    return {
        "window": r0["window_size"],
        "iterations": r0["iterations"],
        "eager": r0["eager"],
        "replays": r0["replays"],
        "checks": r0["checks"],
        "graph_checks": r0["graph_checks"],
        "mismatches": sum(r["mismatches"] for r in per_rank),
        "first_mismatches": first[:FIRST_MISMATCHES],
        "max_error": max(r["max_error"] for r in per_rank),
        "wall_s": max(r["wall_s"] for r in per_rank),
        "device_errors": {str(i): r["device_error"] for i, r in enumerate(per_rank) if r["device_error"]},
        "windows": windows,
        "drift": drifted,
        "drift_note": drift_note,
    }


def render(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    lines = [
        f"ncclep soak: {meta['world_size']}x {meta['device']}, {meta['backend']} vs reference, "
        f"seed {meta['seed']}, check every {meta['check_every']}, graph every {meta['graph_every']} "
        f"({meta['graphs']})",
        f"{'mode':<5}{'experts':>8}{'T':>6}{'hidden':>7}{'k':>3}{'iters':>7}{'eager':>7}{'replays':>8}"
        f"{'wall s':>8}{'checks':>8}{'graph':>6}{'mismatch':>9}{'max err':>10}  device",
    ]
    for mode, m in doc["modes"].items():
        e, t, h, k = meta["sizes"][mode]
        device = "ok" if not m["device_errors"] else f"{len(m['device_errors'])} rank(s) raised"
        lines.append(
            f"{mode:<5}{e:>8}{t:>6}{h:>7}{k:>3}{m['iterations']:>7}{m['eager']:>7}{m['replays']:>8}"
            f"{m['wall_s']:>8.1f}{m['checks']:>8}{m['graph_checks']:>6}{m['mismatches']:>9}"
            f"{m['max_error']:>10.2e}  {device}"
        )
    for mode, m in doc["modes"].items():
        if not m["windows"]:
            continue
        cells = " ".join(
            f"{max(w['max_error'], w['graph_max_error']):.1e}" if w["checks"] + w["graph_checks"] else "-"
            for w in m["windows"]
        )
        lines.append(f"{mode} max combine error per {m['window']}-iteration window: {cells}")
        lines.append(f"{mode} drift: {m['drift_note']}")
        for rank, err in m["device_errors"].items():
            lines.append(f"{mode} rank {rank} check(): {err}")
        for text in m["first_mismatches"]:
            lines.append(f"  mismatch: {text}")
    lines.append(
        f"wall {doc['wall_s']:.1f} s in all (set-up {doc['setup_s']:.1f} s); "
        + ("PASS" if doc["passed"] else "FAIL")
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- per rank, command line


def soak(args: argparse.Namespace, pg: Any, device: torch.device) -> dict[str, Any]:
    """The whole soak on this rank (collective); returns the summary (its ``modes`` and
    ``passed`` the same on every rank)."""
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    gpu = device.type == "cuda"

    def say(message: str) -> None:
        if rank == 0 and not args.quiet:
            print(message, file=sys.stderr, flush=True)

    args.backend_resolved = args.backend if args.backend != "auto" else ("cuda" if gpu else "reference")
    for mode in ("ll", "ht"):
        if getattr(args, f"{mode}_size") is None:
            setattr(args, f"{mode}_size", resolve_sizes(args, mode, gpu))
    modes = [m for m in ("ll", "ht") if getattr(args, f"{m}_iters") > 0]
    soaks = [ModeSoak(m, args, pg, device) for m in modes]  # every group open for the whole run
    for soak in soaks:
        soak.prepare()
    setup_s = time.time() - args.started
    records = {}
    for soak in soaks:
        st = soak.run(say)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, asdict(st), group=pg)
        records[soak.mode] = merge(gathered)
    for soak in soaks:
        soak.close()
    modes_ok = all(
        m["mismatches"] == 0 and not m["device_errors"] and not m["drift"] for m in records.values()
    )
    doc = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "world_size": world,
            "device": torch.cuda.get_device_name(device) if gpu else "CPU",
            "backend": args.backend_resolved,
            "graphs": "CUDA graphs" if gpu else "eager stand-in: no CUDA",
            "torch": torch.__version__,
            **(_native.nccl_versions() if gpu else {"nccl": None}),
            "virtual_nodes": os.environ.get("NCCLEP_VIRTUAL_NODES"),
            "seed": args.seed,
            "check_every": args.check_every,
            "graph_every": args.graph_every,
            "self_test_corrupt": args.self_test_corrupt,
            "sizes": {m: list(getattr(args, f"{m}_size")) for m in modes},
        },
        "modes": records,
        "setup_s": setup_s,
        "wall_s": time.time() - args.started,
        "passed": modes_ok,
    }
    return doc


def run_rank(args: argparse.Namespace, pg: Any, device: torch.device) -> int:
    """Per-rank entry point for ``ncclep.launch``: the soak, then rank 0 prints (and writes) the
    summary; 1 on every rank when the soak failed."""
    doc = soak(args, pg, device)
    if dist.get_rank(pg) == 0:
        print(render(doc), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
            print(f"wrote {args.json}", file=sys.stderr)
    return 0 if doc["passed"] else 1


def resolve_sizes(args: argparse.Namespace, mode: str, gpu: bool) -> tuple[int, int, int, int]:
    defaults = SIZES[(mode, gpu)]
    given = [getattr(args, f"{mode}_{name}") for name in ("experts", "tokens", "hidden", "topk")]
    return tuple(d if g is None else g for g, d in zip(given, defaults, strict=True))  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/soak.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nprocs", type=int, help="processes when started by itself (default: every GPU, or 2)")
    p.add_argument("--ll-iters", type=int, default=10_000)
    p.add_argument("--ht-iters", type=int, default=2_000)
    p.add_argument("--check-every", type=int, default=100, help="check every N-th call against the reference")
    p.add_argument(
        "--graph-every", type=int, default=10, help="every N-th call a CUDA-graph replay (0: none)"
    )
    p.add_argument("--window", type=int, help="iterations per error window (default: a tenth of the mode's)")
    p.add_argument("--seed", type=int, default=0)
    for mode in ("ll", "ht"):
        gpu, cpu = SIZES[(mode, True)], SIZES[(mode, False)]
        for k, name in enumerate(("experts", "tokens", "hidden", "topk")):
            p.add_argument(
                f"--{mode}-{name}",
                type=int,
                help=f"{mode.upper()} {'max tokens per rank' if name == 'tokens' else name} "
                f"(default {gpu[k]} on GPUs, {cpu[k]} on CPU processes)",
            )
    p.add_argument(
        "--backend",
        choices=("auto", "cuda", "reference"),
        default="auto",
        help="the backend under test (auto: cuda on GPUs, reference on CPU processes)",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="timeout_s of the groups under test")
    p.add_argument("--json", help="write the summary as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress lines (stderr), the summary only")
    p.add_argument(
        "--self-test-corrupt",
        action="store_true",
        help="corrupt the outputs at the first checks of each mode: the run must report them and fail",
    )
    return p


def check_args(args: argparse.Namespace) -> str | None:
    if args.nprocs is not None and args.nprocs < 1:
        return "--nprocs must be at least 1"
    for name in ("ll_iters", "ht_iters", "graph_every"):
        if getattr(args, name) < 0:
            return f"--{name.replace('_', '-')} must be at least 0"
    if args.check_every < 1:
        return "--check-every must be at least 1"
    if args.window is not None and args.window < 1:
        return "--window must be at least 1"
    for mode in ("ll", "ht"):
        for name in ("experts", "tokens", "hidden", "topk"):
            value = getattr(args, f"{mode}_{name}")
            if value is not None and value < 1:
                return f"--{mode}-{name} must be positive"
        hidden = getattr(args, f"{mode}_hidden")
        if hidden is not None and hidden % fp8.BLOCK:
            return f"--{mode}-hidden must be a multiple of {fp8.BLOCK} (fp8 payloads)"
    if args.backend == "cuda" and not torch.cuda.is_available():
        return "--backend cuda needs CUDA GPUs (none visible)"
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    problem = check_args(args)
    if problem:
        p.error(problem)
    args.started = time.time()
    args.ll_size = args.ht_size = None  # resolved on the ranks, which know their device
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return launch(run_rank, args, args.nprocs, "soak")


if __name__ == "__main__":
    sys.exit(main())
