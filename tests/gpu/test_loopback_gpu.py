"""GPU, one device: every rank of a group in this process (``ncclep._C.loopback``: the ranks'
windows on this GPU, no NCCL), each rank's calls on a stream of its own. The kernels' multi-rank
protocols (LL: call numbers, received-data marks, acknowledgements; HT: counts, epochs, the
combine's rows; both: the emulated network of virtual nodes) against the per-token oracle of
:mod:`ncclep.testing`, where one GPU is all there is. Every peer is this GPU's memory: nothing here
says anything about speed, and test_ll_gpu.py / test_ht_gpu.py on several GPUs stay the check over
NVLink and NCCL.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import torch

import ncclep
from ncclep import _native, fp8, testing
from ncclep.config import MODE_IDS, GroupConfig
from ncclep.errors import CommError, InvalidArgument
from ncclep.handles import HTDispatchOutput, LLDispatchOutput
from ncclep.loopback import loopback_ranks
from ncclep.workloads import make_routing

pytestmark = pytest.mark.gpu
T_ = TypeVar("T_")

EXPERTS, T, HIDDEN = 32, 40, 7168  # small: the oracle loops over tokens in Python
TIMEOUT_S = 20.0
# (use_fp8, ue8m0, round_scale) of each payload; fp8 scales: fp32, UE8M0 bytes, fp32 powers of two
PAYLOADS = {
    "bf16": (False, False, False),
    "fp8": (True, False, False),
    "ue8m0": (True, True, False),
    "pow2": (True, False, True),
}


@dataclass
class LoopbackGroup:
    cfg: GroupConfig
    ranks: list[Any]  # CudaLL or CudaHT, by mode
    streams: list[torch.cuda.Stream]

    side: torch.cuda.Stream
    busy: torch.Tensor

    def hold_the_sms(self) -> None:
        """A matmul on another stream, issued before a receive half: the receive's blocks then start
        as the matmul's finish, tens of µs apart, so one may end its call before another has begun
        it (what the first to end writes must not be what the last still has to read)."""
        with torch.cuda.stream(self.side):
            torch.mm(self.busy, self.busy)

    def each_rank(self, step: Callable[[int, Any], T_]) -> list[T_]:
        """``step(rank index, rank's backend)`` issued for every rank on that rank's stream, in
        rank order, without waiting: what each returned."""
        out = []
        for r, rank in enumerate(self.ranks):
            with torch.cuda.stream(self.streams[r]):
                out.append(step(r, rank))
        return out

    def close(self) -> None:
        for r in self.ranks:
            r.comm.close()


def loopback_group(
    world: int, nodes: int, sms: int | None, timeout_s: float = TIMEOUT_S, mode: str = "ll"
) -> LoopbackGroup:
    """Every rank of a group on this GPU; ``sms`` None: the device's SMs shared evenly."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not ncclep.cuda_extension_available():
        pytest.skip("needs the ncclep CUDA extension (pip install -e . on a CUDA host)")
    dev = torch.device("cuda", torch.cuda.current_device())
    # Streams share the device's hardware queues beyond CUDA_DEVICE_MAX_CONNECTIONS: a rank queued
    # behind a peer that waits for it would never start.
    if world >= int(os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "8")):
        pytest.skip(f"{world} ranks' streams need CUDA_DEVICE_MAX_CONNECTIONS > {world}")
    if sms is None:
        sms = torch.cuda.get_device_properties(dev).multi_processor_count // world
    cfg = GroupConfig(EXPERTS, T, HIDDEN, mode, world, max_topk=8, num_sms=sms, timeout_s=timeout_s)
    ranks = loopback_ranks(cfg, dev, nodes)
    assert ranks[0].comm.info()["node_size"] == world // nodes
    return LoopbackGroup(
        cfg,
        list(ranks),
        [torch.cuda.Stream(dev) for _ in ranks],
        torch.cuda.Stream(dev),
        torch.randn(8192, 8192, device=dev).to(torch.bfloat16),
    )


@dataclass
class Call:
    """One LL dispatch + combine of every rank: inputs on the CPU (the oracle's) and the device."""

    payload: str
    split: bool  # send and receive halves as separate launches
    world: list[testing.RankInputs]
    device: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _calls(seed: int, world: int, count: int, hidden: int) -> list[Call]:
    g = torch.Generator().manual_seed(seed)
    dev = torch.device("cuda", torch.cuda.current_device())
    routings = ("random", "skewed", "hot")
    calls = []
    for i in range(count):
        topk = (1, 8)[(i // 3) % 2]
        routing = routings[(i // 2) % 3]
        if routing == "hot" and topk > EXPERTS // world:
            routing = "random"
        ranks = []
        for r in range(world):
            tokens = [T, 0, 17, 1][(i + r) % 4]
            x = (torch.randn(tokens, hidden, generator=g) * 3).to(torch.bfloat16)
            hot = min(1, world - 1)
            idx, w = make_routing(
                routing, tokens, EXPERTS, topk, world_size=world, generator=g, masked=2, hot_rank=hot
            )
            ranks.append(testing.RankInputs(x, idx, w))
        payload = list(PAYLOADS)[i % len(PAYLOADS)]
        device = [(r.x.to(dev), r.topk_idx.to(dev), r.topk_weights.to(dev)) for r in ranks]  # type: ignore[union-attr]
        calls.append(Call(payload, i % 3 == 1, ranks, device))
    return calls


@dataclass
class Result:
    dispatched: LLDispatchOutput
    combined: torch.Tensor


def call_inputs(call: Call, rank: int) -> tuple[torch.Tensor, ...]:
    """Rank ``rank``'s dispatch arguments of ``call`` on the device, in ``CudaLL.dispatch`` order."""
    use_fp8, ue8m0, round_scale = PAYLOADS[call.payload]
    return (*call.device[rank], use_fp8, ue8m0, False, round_scale)


def _expert_out(group: LoopbackGroup, rank: int, out: LLDispatchOutput) -> torch.Tensor:
    local = group.cfg.num_local_experts
    expert_fn = testing.scaled_expert(EXPERTS)
    dense = out.x.float() if out.scales is None else fp8.dequantize(out.x, _scales(out))
    return torch.stack([expert_fn(rank * local + e, dense[e]) for e in range(local)])


def _format(call: Call, i: int) -> tuple[bool, bool, bool, bool]:
    use_fp8, ue8m0, round_scale = PAYLOADS[call.payload]
    column_major = use_fp8 and (i // len(PAYLOADS)) % 2 == 1  # the scales as grouped GEMMs read them
    return use_fp8, ue8m0, column_major, round_scale


def _in_lockstep(group: LoopbackGroup, calls: list[Call]) -> list[list[Result]]:
    """Each step of each call issued on every rank, then waited for on the host.

    Besides a check of its own, it loads every kernel the calls use: CUDA loads a module at its
    first launch (lazily, by default), and a load waits for the device's running kernels, which
    here would be ranks spinning on peers whose work the host has yet to issue."""
    return [_lockstep_call(group, call, _format(call, i)) for i, call in enumerate(calls)]


def _lockstep_call(group: LoopbackGroup, call: Call, fmt: tuple[bool, bool, bool, bool]) -> list[Result]:
    sent = group.each_rank(
        lambda r, rank: (rank.dispatch_send if call.split else rank.dispatch)(*call.device[r], *fmt)
    )
    if call.split:
        group.hold_the_sms()
    outs = group.each_rank(lambda r, rank: rank.dispatch_recv(sent[r])) if call.split else sent
    torch.cuda.synchronize()
    expert_outs = group.each_rank(lambda r, _: _expert_out(group, r, outs[r]))
    torch.cuda.synchronize()
    combining = group.each_rank(
        lambda r, rank: (rank.combine_send if call.split else rank.combine)(expert_outs[r], outs[r].handle)
    )
    if call.split:
        group.hold_the_sms()
    combined = group.each_rank(lambda r, rank: rank.combine_recv(combining[r])) if call.split else combining
    torch.cuda.synchronize()
    return [Result(o, c) for o, c in zip(outs, combined, strict=True)]


def _ahead(group: LoopbackGroup, calls: list[Call]) -> list[list[Result]]:
    """Every call of rank 0, then every call of rank 1, ..., each rank on its stream, no wait on
    the host in between: a rank's kernels meet its peers' only on the device, and a rank may be
    calls ahead of one whose work is not even issued yet. The kernels are loaded already
    (_in_lockstep)."""
    results: list[list[Result]] = [[] for _ in calls]
    for r, rank in enumerate(group.ranks):
        with torch.cuda.stream(group.streams[r]):
            for i, call in enumerate(calls):
                x, idx, w = call.device[r]
                fmt = _format(call, i)
                if call.split:
                    out = rank.dispatch_recv(rank.dispatch_send(x, idx, w, *fmt))
                else:
                    out = rank.dispatch(x, idx, w, *fmt)
                expert_out = _expert_out(group, r, out)
                if call.split:
                    combined = rank.combine_recv(rank.combine_send(expert_out, out.handle))
                else:
                    combined = rank.combine(expert_out, out.handle)
                results[i].append(Result(out, combined))
    torch.cuda.synchronize()
    return results


def _scales(out: LLDispatchOutput) -> torch.Tensor:
    """The output's scales one per 128 columns (UE8M0 comes packed four to an int32)."""
    assert out.scales is not None
    return fp8.unpack_ue8m0(out.scales) if out.scales.dtype == torch.int32 else out.scales


def _dispatch_problem(out: LLDispatchOutput, expected: list[list[testing.ExpectedRow]]) -> str | None:
    counts = out.expert_counts.cpu().tolist()
    for e, rows in enumerate(expected):
        if counts[e] != len(rows):
            return f"expert {e}: {counts[e]} rows, expected {len(rows)}"
        if not rows:
            continue
        got = out.x[e, : len(rows)].cpu()
        if not torch.equal(got.view(torch.uint8), torch.stack([r.payload for r in rows]).view(torch.uint8)):
            return f"expert {e}: payload differs"
        if out.scales is not None:
            got_scales = fp8.scales_to_float(_scales(out)[e, : len(rows)].cpu())
            want = torch.stack([fp8.scales_to_float(r.scales) for r in rows])  # type: ignore[arg-type]
            if not torch.equal(got_scales, want):
                return f"expert {e}: scales differ"
    return None


def _problems(group: LoopbackGroup, calls: list[Call], results: list[list[Result]]) -> list[str]:
    problems = []
    cfg = group.cfg
    for r, rank in enumerate(group.ranks):
        error = rank.comm.device_error()
        if error is not None:
            problems.append(f"rank {r}: device error {error}")
    for i, (call, result) in enumerate(zip(calls, results, strict=True)):
        use_fp8, ue8m0, round_scale = PAYLOADS[call.payload]
        oracle_world = call.world
        if use_fp8:  # the experts saw dequantised rows: so does the combine's oracle
            oracle_world = [
                testing.RankInputs(
                    fp8.dequantize(*fp8.quantize(w.x, ue8m0, round_scale)), w.topk_idx, w.topk_weights
                )
                for w in call.world
            ]
        for r, got in enumerate(result):
            what = f"call {i} ({call.payload}{' split' if call.split else ''}) rank {r}"
            expected = testing.ll_dispatch_expected(cfg, r, call.world, use_fp8, ue8m0, round_scale)
            problem = _dispatch_problem(got.dispatched, expected)
            if problem:
                problems.append(f"{what}: {problem}")
                continue
            want = testing.ll_combine_expected(cfg, r, oracle_world, testing.scaled_expert(EXPERTS))
            err = testing.relative_error(got.combined.cpu(), want) if want.numel() else 0.0
            if err > testing.COMBINE_TOLERANCE:
                problems.append(f"{what}: combine relative error {err:.3g}")
    return problems


@pytest.mark.parametrize(
    "world,nodes,sms",
    [(2, 1, None), (2, 2, None), (4, 1, None), (4, 2, None), (4, 1, 3), (4, 2, 3), (8, 1, None)],
)
def test_ll_loopback_matches_oracle(world: int, nodes: int, sms: int | None) -> None:
    """24 calls of every rank (payloads, split halves, top-k 1 and 8, token counts 0 to T changing
    every call), in lockstep and then issued all at once: every rank's dispatch bit-exact, its
    combine within tolerance."""
    group = loopback_group(world, nodes, sms)
    try:
        for hidden in (2048, HIDDEN):
            calls = _calls(world * 100 + nodes * 10 + hidden, world, 24, hidden)
            torch.cuda.synchronize()  # the inputs are on the device before any rank's stream reads them
            assert _problems(group, calls, _in_lockstep(group, calls)) == []
            assert _problems(group, calls, _ahead(group, calls)) == []
    finally:
        group.close()


@pytest.mark.parametrize("world,nodes", [(2, 1), (4, 2)])
def test_ll_loopback_rejected_dispatch_reaches_every_peer(world: int, nodes: int) -> None:
    """The last rank rejects a dispatch (it takes part with its reason and no tokens): every other
    rank's call returns, its next read of the error word names that rank and the reason, and the
    calls after it are exact on every rank."""
    group = loopback_group(world, nodes, None)
    bad = world - 1
    calls = _calls(9, world, 4, HIDDEN)
    torch.cuda.synchronize()
    try:
        assert _problems(group, calls[:1], _in_lockstep(group, calls[:1])) == []  # loads the kernels
        for r, rank in enumerate(group.ranks):
            with torch.cuda.stream(group.streams[r]):
                if r == bad:
                    with pytest.raises(InvalidArgument):
                        rank.reject("ll_dispatch", InvalidArgument("x must be bf16", reason="dtype"))
                else:
                    rank.dispatch(*call_inputs(calls[1], r))
        torch.cuda.synchronize()
        for rank in group.ranks[:bad]:
            with pytest.raises(CommError) as info:
                rank.raise_device_error()
            assert info.value.reason == "peer_rejected" and info.value.peer == bad, info.value
            assert info.value.group_usable
        assert group.ranks[bad].comm.device_error() is None
        assert _problems(group, calls[2:], _in_lockstep(group, calls[2:])) == []
    finally:
        group.close()


@pytest.mark.parametrize("world,nodes", [(2, 1), (4, 2)])
def test_ll_loopback_cuda_graphs_replayed_together(world: int, nodes: int) -> None:
    """Each rank's dispatch -> experts -> combine captured in a CUDA graph of its own; the ranks'
    graphs replayed on their streams at once, 20 times with new inputs: every combine matches the
    oracle."""
    group = loopback_group(world, nodes, None)
    dev = torch.device("cuda", torch.cuda.current_device())
    local = group.cfg.num_local_experts
    scale = torch.linspace(0.5, 1.5, local, device=dev).view(-1, 1, 1)
    g = torch.Generator().manual_seed(31)

    def inputs() -> list[testing.RankInputs]:
        out = []
        for _ in range(world):
            x = (torch.randn(T, HIDDEN, generator=g) * 3).to(torch.bfloat16)
            idx, w = make_routing("random", T, EXPERTS, 8, world_size=world, generator=g, masked=2)
            out.append(testing.RankInputs(x, idx, w))
        return out

    static = [tuple(t.to(dev) for t in (i.x, i.topk_idx, i.topk_weights)) for i in inputs()]  # type: ignore[union-attr]

    def dispatch(r: int) -> LLDispatchOutput:
        return group.ranks[r].dispatch(*static[r], False, False, False, False)

    def experts(d: LLDispatchOutput) -> torch.Tensor:
        return (d.x.float() * scale).to(torch.bfloat16)

    def combine(r: int, d: LLDispatchOutput, y: torch.Tensor) -> torch.Tensor:
        return group.ranks[r].combine(y, d.handle)

    try:
        torch.cuda.synchronize()
        for _ in range(2):  # each step of every rank, in lockstep: loads every kernel the graphs use
            ds = []
            for r in range(world):
                with torch.cuda.stream(group.streams[r]):
                    ds.append(dispatch(r))
            torch.cuda.synchronize()
            ys = [experts(d) for d in ds]
            torch.cuda.synchronize()
            for r in range(world):
                with torch.cuda.stream(group.streams[r]):
                    combine(r, ds[r], ys[r])
            torch.cuda.synchronize()
        graphs, outs = [], []
        for r in range(world):  # capturing runs nothing: no rank waits for another here
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                d = dispatch(r)
                outs.append(combine(r, d, experts(d)))
            graphs.append(graph)
        torch.cuda.synchronize()

        def expert_fn(e: int, row: torch.Tensor) -> torch.Tensor:
            return (row.float() * scale.view(-1)[e % local].cpu()).to(torch.bfloat16)

        problems = []
        for replay in range(20):
            world_inputs = inputs()
            for r, i in enumerate(world_inputs):
                for dst, src in zip(static[r], (i.x, i.topk_idx, i.topk_weights), strict=True):
                    dst.copy_(src)
            torch.cuda.synchronize()
            group.each_rank(lambda r, _: graphs[r].replay())
            torch.cuda.synchronize()
            for r in range(world):
                want = testing.ll_combine_expected(group.cfg, r, world_inputs, expert_fn)
                err = testing.relative_error(outs[r].cpu(), want)
                if err > testing.COMBINE_TOLERANCE:
                    problems.append(f"replay {replay} rank {r}: combine relative error {err:.3g}")
        assert problems == []
        assert [rank.comm.device_error() for rank in group.ranks] == [None] * world
    finally:
        group.close()


@pytest.mark.parametrize("world,nodes", [(2, 1), (4, 2)])
def test_ll_loopback_missing_peer_times_out_cleanly(world: int, nodes: int) -> None:
    """The last rank never calls: every other rank's dispatch gives up at the deadline and names it,
    without a fault on the device, and a new group on the same device then works."""
    group = loopback_group(world, nodes, None, timeout_s=2.0)
    calls = _calls(7, world, 1, HIDDEN)
    torch.cuda.synchronize()
    try:
        for r, rank in enumerate(group.ranks[:-1]):
            with torch.cuda.stream(group.streams[r]):
                rank.dispatch(*call_inputs(calls[0], r))
        torch.cuda.synchronize()  # raises if a kernel faulted
        for r, rank in enumerate(group.ranks[:-1]):
            error = rank.comm.device_error()
            assert error is not None and error[0] == "timeout", (r, error)
    finally:
        group.close()
    group = loopback_group(world, nodes, None)
    try:
        calls = _calls(8, world, 4, HIDDEN)
        torch.cuda.synchronize()
        assert _problems(group, calls, _in_lockstep(group, calls)) == []
    finally:
        group.close()


# ------------------------------------------------------------------------------------------ HT

HT_LAYOUTS = [("flat", 1), ("expert_major", 1), ("expert_major", 16)]


@dataclass
class HTCall:
    layout: str
    alignment: int
    world: list[testing.RankInputs]  # x as dispatched: bf16, or the fp8 rows
    scales: list[torch.Tensor | None]
    device: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]]
    cached: list[torch.Tensor]  # per rank, rows sent again along the dispatch's handle (a backward)
    cached_device: list[torch.Tensor]


def _ht_calls(seed: int, world: int, count: int) -> list[HTCall]:
    g = torch.Generator().manual_seed(seed)
    dev = torch.device("cuda", torch.cuda.current_device())
    calls = []
    for i in range(count):
        layout, alignment = HT_LAYOUTS[i % len(HT_LAYOUTS)]
        topk = (1, 8)[(i // 2) % 2]
        payload = ("bf16", "fp8", "ue8m0")[(i // 3) % 3]
        ranks, scales, device, cached = [], [], [], []
        for r in range(world):
            tokens = [T, 0, 17, 1][(i + r) % 4]
            x = (torch.randn(tokens, HIDDEN, generator=g) * 3 + 0.01).to(torch.bfloat16)
            idx, w = make_routing("random", tokens, EXPERTS, topk, world_size=world, generator=g, masked=2)
            s = None
            if payload != "bf16":
                x, s = fp8.quantize(x, ue8m0=payload == "ue8m0")
            ranks.append(testing.RankInputs(x, idx, w))
            scales.append(s)
            ids = idx.to(torch.int32) if i % 2 else idx
            device.append((x.to(dev), None if s is None else s.to(dev), ids.to(dev), w.to(dev)))
            # any dtype and width: fp32 rows of 96, or bf16 rows as wide as the dispatch's
            cached.append(
                torch.randn(tokens, 96, generator=g)
                if i % 2
                else torch.randn(tokens, HIDDEN, generator=g).to(torch.bfloat16)
            )
        calls.append(HTCall(layout, alignment, ranks, scales, device, cached, [c.to(dev) for c in cached]))
    return calls


def _ht_dense(out: HTDispatchOutput) -> torch.Tensor:
    return out.x.float() if out.scales is None else fp8.dequantize(out.x, out.scales)


HTResult = tuple[HTDispatchOutput, torch.Tensor, torch.Tensor]  # dispatch, combine, cached dispatch


def _ht_lockstep(group: LoopbackGroup, calls: list[HTCall]) -> list[list[HTResult]]:
    """As _in_lockstep, for HT: every rank's dispatch, then every rank's expert rows (each row
    times its rank + 1), then every rank's combine, then every rank's cached dispatch."""
    return [_ht_lockstep_call(group, call) for call in calls]


def _ht_lockstep_call(group: LoopbackGroup, call: HTCall) -> list[HTResult]:
    outs = group.each_rank(lambda r, rank: rank.dispatch(*call.device[r], call.layout, call.alignment))
    torch.cuda.synchronize()
    rows = group.each_rank(lambda r, _: (_ht_dense(outs[r]) * (r + 1)).to(torch.bfloat16))
    torch.cuda.synchronize()
    combined = group.each_rank(lambda r, rank: rank.combine(rows[r], outs[r].handle, None)[0])
    torch.cuda.synchronize()
    cached = group.each_rank(lambda r, rank: rank.dispatch_cached(call.cached_device[r], outs[r].handle))
    torch.cuda.synchronize()
    return list(zip(outs, combined, cached, strict=True))


def _ht_ahead(group: LoopbackGroup, calls: list[HTCall]) -> list[list[HTResult]]:
    """As _ahead, for HT: every call of rank 0, then of rank 1, ..., no wait on the host."""
    results: list[list[HTResult]] = [[] for _ in calls]
    for r, rank in enumerate(group.ranks):
        with torch.cuda.stream(group.streams[r]):
            for i, call in enumerate(calls):
                out = rank.dispatch(*call.device[r], call.layout, call.alignment)
                rows = (_ht_dense(out) * (r + 1)).to(torch.bfloat16)
                combined = rank.combine(rows, out.handle, None)[0]
                results[i].append((out, combined, rank.dispatch_cached(call.cached_device[r], out.handle)))
    torch.cuda.synchronize()
    return results


def _ht_problem(cfg: GroupConfig, r: int, call: HTCall, result: HTResult) -> str | None:
    out, combined, cached = result
    rows, counts = testing.ht_dispatch_expected(cfg, r, call.world, call.layout, call.alignment)
    if out.expert_counts.cpu().tolist() != counts:
        return f"expert_counts {out.expert_counts.cpu().tolist()} != {counts}"
    if int(out.num_recv[0]) != len(rows):
        return f"num_recv {int(out.num_recv[0])} != {len(rows)}"
    x, ids = out.x.cpu(), out.topk_idx.cpu()
    weights = out.topk_weights.cpu() if out.topk_weights is not None else None
    scales = out.scales.cpu() if out.scales is not None else None
    for n, row in enumerate(rows):
        if row is None:
            continue
        if not torch.equal(x[n].view(torch.uint8), call.world[row.src].x[row.token].view(torch.uint8)):
            return f"row {n} payload differs"
        source_scales = call.scales[row.src]
        if scales is not None and source_scales is not None:
            want = fp8.scales_to_float(source_scales[row.token])
            if not torch.equal(fp8.scales_to_float(scales[n]), want):
                return f"row {n} scales differ"
        if ids[n].tolist() != row.local_ids:
            return f"row {n} expert ids {ids[n].tolist()} != {row.local_ids}"
        if weights is not None and weights[n].tolist() != row.weights:
            return f"row {n} weights differ"
    cached_rows = cached.cpu()
    for n in range(cached_rows.shape[0]):
        row = rows[n] if n < len(rows) else None
        want = call.cached[row.src][row.token] if row is not None else torch.zeros_like(cached_rows[n])
        if not torch.equal(cached_rows[n], want):
            return f"cached dispatch: row {n} differs"
    oracle_world = [
        testing.RankInputs(w.x if s is None else fp8.dequantize(w.x, s), w.topk_idx, w.topk_weights)
        for w, s in zip(call.world, call.scales, strict=True)
    ]
    want = testing.ht_combine_expected(
        cfg, r, oracle_world, call.layout, lambda d, _e, x: (x.float() * (d + 1)).to(torch.bfloat16)
    )
    if want.numel() and testing.relative_error(combined.cpu(), want) > testing.COMBINE_TOLERANCE:
        return f"combine relative error {testing.relative_error(combined.cpu(), want):.3g}"
    return None


def _ht_problems(group: LoopbackGroup, calls: list[HTCall], results: list[list[HTResult]]) -> list[str]:
    problems = [
        f"rank {r}: device error {e}" for r, b in enumerate(group.ranks) if (e := b.comm.device_error())
    ]
    for i, (call, result) in enumerate(zip(calls, results, strict=True)):
        for r, rank_result in enumerate(result):
            problem = _ht_problem(group.cfg, r, call, rank_result)
            if problem:
                problems.append(f"call {i} ({call.layout}/{call.alignment}) rank {r}: {problem}")
    return problems


@pytest.mark.parametrize("world,nodes,sms", [(2, 1, None), (4, 1, None), (4, 2, None), (4, 1, 4), (4, 2, 6)])
def test_ht_loopback_matches_oracle(world: int, nodes: int, sms: int | None) -> None:
    """18 HT calls of every rank (layouts, alignments, bf16 / fp8 / UE8M0, top-k 1 and 8, int32
    and int64 ids, token counts 0 to T), in lockstep and then issued all at once: every rank's
    dispatch exact, its combine within tolerance, and a cached dispatch of other rows (fp32 or
    bf16) along the dispatch's handle exact."""
    group = loopback_group(world, nodes, sms, mode="ht")
    try:
        calls = _ht_calls(world * 10 + nodes, world, 18)
        torch.cuda.synchronize()
        assert _ht_problems(group, calls, _ht_lockstep(group, calls)) == []
        assert _ht_problems(group, calls, _ht_ahead(group, calls)) == []
    finally:
        group.close()


def test_loopback_refuses_more_sms_than_the_device() -> None:
    """Every rank's kernels must fit on the device at once, or the first to spin would starve the
    rest: a group that would not fit is refused with the SMs it may use."""
    if not torch.cuda.is_available() or not ncclep.cuda_extension_available():
        pytest.skip("needs a CUDA GPU and the extension")
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    with pytest.raises(RuntimeError, match="do not fit"):
        dev = torch.cuda.current_device()
        _native.module().loopback(2, dev, MODE_IDS["ll"], EXPERTS, T, HIDDEN, 8, sms, 5.0)
