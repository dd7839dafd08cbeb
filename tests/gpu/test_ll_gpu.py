"""GPU: the LL kernels against the reference backend, on the same inputs, in one NCCL group."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import (
    assert_peer_timeout_reported,
    gpu_pool,
    own_rejection,
    peer_rejection,
    peer_skips_a_call,
    run_isolated,
    virtual_nodes,
)

import ncclep
from ncclep.bench.timing import capture_graph
from ncclep.testing import ll_dispatch_difference, relative_error
from ncclep.workloads import make_routing

pytestmark = pytest.mark.gpu

EXPERTS, T, HIDDEN = 64, 64, 7168
# (use_fp8, ue8m0, round_scale) of each payload; fp8 scales: fp32, UE8M0 bytes, fp32 powers of two
PAYLOADS = {
    "bf16": (False, False, False),
    "fp8": (True, False, False),
    "ue8m0": (True, True, False),
    "pow2": (True, False, True),
}


def _groups(max_topk: int = 16, nodes: int = 1) -> tuple[ncclep.Group, ncclep.Group]:
    with virtual_nodes(nodes):
        cuda = ncclep.Group(EXPERTS, T, HIDDEN, mode="ll", max_topk=max_topk, backend="cuda", timeout_s=20.0)
    assert cuda.native_info["node_size"] == dist.get_world_size() // nodes
    assert cuda.num_nodes == nodes
    ref = ncclep.Group(EXPERTS, T, HIDDEN, mode="ll", max_topk=max_topk, backend="reference")
    return cuda, ref


def _inputs(g: torch.Generator, tokens: int, hidden: int, topk: int, routing: str, dev: torch.device):
    world = dist.get_world_size()
    x = (torch.randn(tokens, hidden, generator=g) * 3).to(torch.bfloat16)
    masked = 3 if routing == "random" else 0
    hot = min(1, world - 1)  # another rank where there is one
    idx, w = make_routing(
        routing, tokens, EXPERTS, topk, world_size=world, generator=g, masked=masked, hot_rank=hot
    )
    return x.to(dev), idx.to(dev), w.to(dev)


def _matrix(seed: int, nodes: int = 1) -> list[str]:
    """Every routing / top-k / hidden / payload combination, dispatch bit-exact and combine close."""
    rank = dist.get_rank()
    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(seed * 131 + rank)
    cuda, ref = _groups(nodes=nodes)
    problems = []
    cases = []
    for routing in ("random", "skewed", "hot"):
        for topk in (1, 8, 16):
            for hidden in (2048, 4096, 7168):
                for payload in PAYLOADS:
                    cases.append((routing, topk, hidden, payload))
    for i, (routing, topk, hidden, payload) in enumerate(cases):
        if routing == "hot" and topk > EXPERTS // dist.get_world_size():
            continue
        shape_case = i // len(PAYLOADS)  # each payload meets every token count and both scale layouts
        tokens = [T, 0, 17, 1][(i + shape_case + rank) % 4]
        x, idx, w = _inputs(g, tokens, hidden, topk, routing, dev)
        use_fp8, ue8m0, round_scale = PAYLOADS[payload]
        column_major = use_fp8 and shape_case % 2 == 1  # the scales as grouped GEMMs read them
        fmt = dict(use_fp8=use_fp8, ue8m0=ue8m0, column_major_scales=column_major, round_scale=round_scale)
        a = cuda.ll_dispatch(x, idx, w, **fmt)
        b = ref.ll_dispatch(x, idx, w, **fmt)
        problem = ll_dispatch_difference(a, b)
        if problem:
            layout = " column-major" if column_major else ""
            problems.append(f"{routing} k={topk} h={hidden} {payload}{layout} B={tokens}: {problem}")
            continue
        y = (torch.randn(a.x.shape, generator=g) * 2).to(torch.bfloat16).to(dev)
        # every third case weights its choices at the combine instead (fewer columns than top-k too)
        given = None
        if i % 3 == 2:
            given = torch.rand(tokens, max(1, topk - i % 2), generator=g).to(dev)
        out_a = cuda.ll_combine(y, a.handle, topk_weights=given)
        out_b = ref.ll_combine(y, b.handle, topk_weights=given)
        if tokens and relative_error(out_a, out_b) > 1e-2:
            weights = " combine weights" if given is not None else ""
            problems.append(
                f"{routing} k={topk} h={hidden} B={tokens}{weights}: combine error "
                f"{relative_error(out_a, out_b):.3g}"
            )
    cuda.check()
    cuda.close()
    ref.close()
    return problems


@pytest.mark.parametrize("world,nodes", [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (8, 1), (8, 2)])
def test_ll_matches_reference(world: int, nodes: int) -> None:
    for problems in gpu_pool(world).run(_matrix, world, nodes):
        assert problems == []


def _many_iterations(count: int, nodes: int = 1) -> list[str]:
    """Consecutive dispatch/combine pairs with token counts and routing changing every call."""
    rank = dist.get_rank()
    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(7 + rank)
    cuda, ref = _groups(max_topk=8, nodes=nodes)
    problems = []
    for i in range(count):
        tokens = int(torch.randint(0, T + 1, (1,), generator=g))
        routing = ("random", "skewed", "hot")[i % 3]
        x, idx, w = _inputs(g, tokens, HIDDEN, 8, routing, dev)
        use_fp8 = i % 2 == 1
        a = cuda.ll_dispatch(x, idx, w, use_fp8=use_fp8)
        b = ref.ll_dispatch(x, idx, w, use_fp8=use_fp8)
        problem = ll_dispatch_difference(a, b)
        y = torch.randn(a.x.shape, device=dev).to(torch.bfloat16)
        given = torch.rand(tokens, 8, generator=g).to(dev) if i % 3 == 1 else None  # weights at the combine
        # every rank calls
        out_a, out_b = (
            cuda.ll_combine(y, a.handle, topk_weights=given),
            ref.ll_combine(y, b.handle, topk_weights=given),
        )
        err = relative_error(out_a, out_b) if tokens else 0.0
        # no break: every rank must make the same collective calls
        if (problem or err > 1e-2) and len(problems) < 5:
            problems.append(f"iteration {i}: {problem or f'combine error {err:.3g}'}")
    cuda.check()
    cuda.close()
    ref.close()
    return problems


@pytest.mark.parametrize("world,nodes", [(1, 1), (2, 1), (4, 1), (4, 2), (8, 1), (8, 2)])
def test_ll_1000_iterations(world: int, nodes: int) -> None:
    for problems in gpu_pool(world).run(_many_iterations, 1000, nodes):
        assert problems == []


def _send_only_and_graph(replays: int, nodes: int = 1) -> list[str]:
    rank = dist.get_rank()
    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(99 + rank)
    cuda, ref = _groups(max_topk=8, nodes=nodes)
    problems = []
    # send_only: two micro-batches in flight, receive halves later
    batches = [_inputs(g, T - 3 * k, HIDDEN, 8, "random", dev) for k in range(2)]
    pending = [cuda.ll_dispatch(*b, use_fp8=True, send_only=True) for b in batches]
    outs = [p.wait() for p in pending]
    for b, out in zip(batches, outs, strict=True):
        problem = ll_dispatch_difference(out, ref.ll_dispatch(*b, use_fp8=True))
        if problem:
            problems.append(f"send_only dispatch: {problem}")
    ys = [torch.randn(o.x.shape, device=dev).to(torch.bfloat16) for o in outs]
    # the second micro-batch's weights come with its combine: both parities in flight, one with them
    given = [None, torch.rand(batches[1][0].shape[0], 8, generator=g).to(dev)]
    combined = [
        cuda.ll_combine(y, o.handle, send_only=True, topk_weights=w)
        for y, o, w in zip(ys, outs, given, strict=True)
    ]
    for k, c in enumerate(combined):
        expected = ref.ll_combine(
            ys[k], ref.ll_dispatch(*batches[k], use_fp8=True).handle, topk_weights=given[k]
        )
        if relative_error(c.wait(), expected) > 1e-2:
            problems.append(f"send_only combine {k}")

    # CUDA graph: dispatch -> stand-in experts -> combine, captured once, replayed with new inputs
    static_x, static_idx, static_w = _inputs(g, T, HIDDEN, 8, "random", dev)
    scale = torch.linspace(0.5, 1.5, EXPERTS // dist.get_world_size(), device=dev).view(-1, 1, 1)

    static_cw = torch.rand(T, 8, generator=g).to(dev)  # the second graph's weights, given to its combine

    def step(given: torch.Tensor | None) -> torch.Tensor:
        d = cuda.ll_dispatch(static_x, static_idx, static_w)
        return cuda.ll_combine((d.x.float() * scale).to(torch.bfloat16), d.handle, topk_weights=given)

    graphs = [capture_graph(lambda: step(None)), capture_graph(lambda: step(static_cw))]
    for i in range(replays):
        x, idx, w = _inputs(g, T, HIDDEN, 8, ("random", "skewed", "hot")[i % 3], dev)
        cw = torch.rand(T, 8, generator=g).to(dev)
        static_x.copy_(x)
        static_idx.copy_(idx)
        static_w.copy_(w)
        static_cw.copy_(cw)
        graph, static_out = graphs[i % 2]
        graph.replay()
        if i % 50 < 2 or i == replays - 1:
            d = ref.ll_dispatch(x, idx, w)
            expected = ref.ll_combine(
                (d.x.float() * scale).to(torch.bfloat16), d.handle, topk_weights=(None, cw)[i % 2]
            )
            err = relative_error(static_out, expected)
            if err > 1e-2 and len(problems) < 5:
                problems.append(f"graph {i % 2} replay {i}: error {err:.3g}")
    cuda.check()
    cuda.close()
    ref.close()
    return problems


@pytest.mark.parametrize("world,nodes", [(1, 1), (2, 1), (4, 1), (4, 2), (8, 1), (8, 2)])
def test_ll_send_only_and_cuda_graph(world: int, nodes: int) -> None:
    for problems in gpu_pool(world).run(_send_only_and_graph, 1000, nodes):
        assert problems == []


def _receives_start_apart(calls: int, nodes: int = 1) -> list[str]:
    """Receive halves launched while a matmul on another stream holds the SMs: the receive's blocks
    start as the matmul's finish, tens of µs apart, so one block may end its call before another
    has begun it (what the first to end writes must not be what the last still has to read)."""
    rank = dist.get_rank()
    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(123 + rank)
    cuda, ref = _groups(max_topk=8, nodes=nodes)
    side = torch.cuda.Stream(dev)
    busy = torch.randn(8192, 8192, device=dev).to(torch.bfloat16)

    def hold_the_sms() -> None:
        with torch.cuda.stream(side):
            torch.mm(busy, busy)

    problems = []
    for i in range(calls):
        x, idx, w = _inputs(g, T, HIDDEN, 8, "random", dev)
        pending = cuda.ll_dispatch(x, idx, w, use_fp8=True, send_only=True)
        hold_the_sms()
        out = pending.wait()
        expected = ref.ll_dispatch(x, idx, w, use_fp8=True)
        problem = ll_dispatch_difference(out, expected)
        y = torch.randn(out.x.shape, device=dev).to(torch.bfloat16)
        combining = cuda.ll_combine(y, out.handle, send_only=True)
        hold_the_sms()
        err = relative_error(combining.wait(), ref.ll_combine(y, expected.handle))
        if (problem or err > 1e-2) and len(problems) < 5:
            problems.append(f"call {i}: {problem or f'combine error {err:.3g}'}")
    torch.cuda.synchronize(dev)
    cuda.check()
    cuda.close()
    ref.close()
    return problems


@pytest.mark.parametrize("world,nodes", [(1, 1), (2, 1), (4, 1), (4, 2)])
def test_ll_receive_blocks_start_apart(world: int, nodes: int) -> None:
    for problems in gpu_pool(world).run(_receives_start_apart, 20, nodes):
        assert problems == []


def _compiled_step(calls: int) -> list[str]:
    """A decode step under torch.compile(fullgraph=True) on the CUDA kernels, against the reference."""
    rank = dist.get_rank()
    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(5 + rank)
    cuda, ref = _groups(max_topk=8)
    scale = torch.linspace(0.5, 1.5, EXPERTS // dist.get_world_size(), device=dev).view(-1, 1, 1)

    def step(group_id: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        recv_x, _, _, *handle = torch.ops.ncclep.ll_dispatch(group_id, x, idx, w, False, False)
        y = (recv_x.float() * scale).to(torch.bfloat16)
        return torch.ops.ncclep.ll_combine(group_id, y, *handle)

    compiled = torch.compile(step, fullgraph=True)
    problems = []
    for i in range(calls):
        tokens = [T, 5, 0, 33][(i + rank) % 4]
        x, idx, w = _inputs(g, tokens, HIDDEN, 8, ("random", "skewed", "hot")[i % 3], dev)
        out = compiled(cuda.id, x, idx, w)
        d = ref.ll_dispatch(x, idx, w)
        expected = ref.ll_combine((d.x.float() * scale).to(torch.bfloat16), d.handle)
        err = relative_error(out, expected) if tokens else 0.0
        if err > 1e-2 and len(problems) < 5:
            problems.append(f"call {i} ({tokens} tokens): error {err:.3g}")
    cuda.check()
    cuda.close()
    ref.close()
    return problems


def test_ll_torch_compile() -> None:
    for problems in gpu_pool(2).run(_compiled_step, 8):
        assert problems == []


def _skipped_call() -> str:
    """Rank 1 skips a dispatch: rank 0 must raise CommError naming it, within the timeout."""
    dev = torch.device("cuda", torch.cuda.current_device())
    group = ncclep.Group(EXPERTS, T, 1024, mode="ll", backend="cuda", timeout_s=2.0)
    x, idx, w = _inputs(torch.Generator().manual_seed(dist.get_rank()), 8, 1024, 4, "random", dev)
    return peer_skips_a_call(group, lambda: group.ll_dispatch(x, idx, w))


def test_ll_timeout_names_the_peer() -> None:
    assert_peer_timeout_reported(_skipped_call)


BAD = 1  # the rank that rejects its arguments in the rejection tests


def _rejected_calls(nodes: int) -> list[str]:
    """Rank BAD rejects an LL dispatch (float32 x), then an LL combine (the reference group's
    handle): it raises InvalidArgument at once; every other rank's call returns and its next call
    raises CommError(peer_rejected) naming rank BAD. The calls that follow, on every rank, match
    the reference: the group stays usable."""
    rank = dist.get_rank()
    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(11 + rank)
    cuda, ref = _groups(max_topk=8, nodes=nodes)
    problems: list[str | None] = []

    def round_trip(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, what: str) -> None:
        a, b = cuda.ll_dispatch(x, idx, w), ref.ll_dispatch(x, idx, w)
        y = torch.randn(a.x.shape, generator=g).to(torch.bfloat16).to(dev)
        out_a, out_b = cuda.ll_combine(y, a.handle), ref.ll_combine(y, b.handle)
        problem = ll_dispatch_difference(a, b)
        err = relative_error(out_a, out_b)
        if problem or err > 1e-2:
            problems.append(f"{what}: {problem or f'combine error {err:.3g}'}")

    x, idx, w = _inputs(g, T, HIDDEN, 8, "random", dev)
    if rank == BAD:
        problems.append(own_rejection(lambda: cuda.ll_dispatch(x.float(), idx, w), "dtype"))
    else:
        cuda.ll_dispatch(x, idx, w)  # returns; its outputs lack rank BAD's tokens: discarded
        again = lambda: cuda.ll_dispatch(x, idx, w)  # noqa: E731
        problems.append(peer_rejection(again, BAD, "dtype", "ll_dispatch receive"))
    round_trip(x, idx, w, "the round trip after the rejected dispatch")

    a, b = cuda.ll_dispatch(x, idx, w), ref.ll_dispatch(x, idx, w)
    y = torch.randn(a.x.shape, generator=g).to(torch.bfloat16).to(dev)
    if rank == BAD:
        problems.append(own_rejection(lambda: cuda.ll_combine(y, b.handle), "handle"))
    else:
        # a peer learns of a rejected combine when it sent tokens to the rejecting rank
        assert bool((a.handle.send_slots[:, BAD] >= 0).any()), "the inputs route nothing to rank BAD"
        cuda.ll_combine(y, a.handle)
        again = lambda: cuda.ll_combine(y, a.handle)  # noqa: E731
        problems.append(peer_rejection(again, BAD, "handle", "ll_combine receive"))
    err = relative_error(cuda.ll_combine(y, a.handle), ref.ll_combine(y, b.handle))
    if err > 1e-2:
        problems.append(f"the combine again after the rejected one: error {err:.3g}")
    round_trip(x, idx, w, "the round trip after the rejected combine")

    # a combine with weights given to it, rejected by rank BAD (weights of the wrong shape): the
    # others' send halves must not wait for its weights, and the next such combine matches
    a, b = cuda.ll_dispatch(x, idx, w), ref.ll_dispatch(x, idx, w)
    cw = torch.rand(x.shape[0], 8, generator=g).to(dev)
    if rank == BAD:
        problems.append(own_rejection(lambda: cuda.ll_combine(y, a.handle, topk_weights=cw[:1]), "shape"))
    else:
        cuda.ll_combine(y, a.handle, topk_weights=cw)
        again = lambda: cuda.ll_combine(y, a.handle, topk_weights=cw)  # noqa: E731
        problems.append(peer_rejection(again, BAD, "shape", "ll_combine receive"))
    err = relative_error(
        cuda.ll_combine(y, a.handle, topk_weights=cw), ref.ll_combine(y, b.handle, topk_weights=cw)
    )
    if err > 1e-2:
        problems.append(f"the weighted combine after the rejected one: error {err:.3g}")
    cuda.check()
    cuda.close()
    ref.close()
    return [p for p in problems if p]


@pytest.mark.parametrize("world,nodes", [(2, 1), (4, 1), (2, 2), (4, 2)])
def test_ll_rejected_call_reported_to_peers(world: int, nodes: int) -> None:
    for problems in gpu_pool(world).run(_rejected_calls, nodes):
        assert problems == []


def _timeout_then_new_group() -> str:
    """Rank 1 skips a dispatch: rank 0 raises CommError (timeout), then its next call CommError
    (broken) at once. Both ranks close the group and make a new one on the same process group,
    whose calls match the reference."""
    rank = dist.get_rank()
    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(rank)
    group = ncclep.Group(EXPERTS, T, 1024, mode="ll", backend="cuda", timeout_s=2.0)
    x, idx, w = _inputs(g, 8, 1024, 4, "random", dev)
    seen = peer_skips_a_call(group, lambda: group.ll_dispatch(x, idx, w))
    if rank == 0:
        try:
            group.ll_dispatch(x, idx, w)
            seen += " | next call: no error"
        except ncclep.CommError as exc:
            seen += f" | next call: {exc.reason}"
    group.close()
    cuda = ncclep.Group(EXPERTS, T, 1024, mode="ll", backend="cuda", timeout_s=20.0)
    ref = ncclep.Group(EXPERTS, T, 1024, mode="ll", backend="reference")
    a, b = cuda.ll_dispatch(x, idx, w), ref.ll_dispatch(x, idx, w)
    y = torch.randn(a.x.shape, generator=g).to(torch.bfloat16).to(dev)
    err = relative_error(cuda.ll_combine(y, a.handle), ref.ll_combine(y, b.handle))
    cuda.check()
    cuda.close()
    ref.close()
    return f"{seen} | new group: {ll_dispatch_difference(a, b)}, combine error {err:.3g}"


def test_ll_timeout_then_close_and_new_group() -> None:
    results = run_isolated(2, _timeout_then_new_group)
    assert results[0].startswith("CommError peer=1") and "next call: broken" in results[0], results[0]
    assert results[1].startswith("skipped"), results[1]
    for r in results:
        new = r.split("new group: ")[1]
        assert new.startswith("None, combine error") and float(new.split()[-1]) <= 1e-2, r
