"""GPU: the HT kernels against the reference backend, on the same inputs, in one NCCL group.

Dispatch compares bit-exactly: counts, every handle tensor, topk_idx (and its dtype, that of the
given ids: int64 or int32) and topk_weights on every row (their fill values included), and x /
scales on the rows that hold a token (``recv_slot >= 0``): the reference leaves the other rows
uninitialised (``torch.empty``), and so do the kernels.
Combine compares within bf16 rounding (the expert-side sums may add a token's rows in another
order). Every rank makes the same sequence of collective calls in every test.

``nodes=2`` (4 GPUs, ``NCCLEP_VIRTUAL_NODES=2``) runs the hierarchical path: tokens for the other
virtual node cross the emulated network once per node and are forwarded there; its test ids end
in ``virtual2`` (select them with ``-k virtual``). Combine then sums the other node's ranks at its
forwarder first, which the bf16 tolerance covers.
"""

from __future__ import annotations

from typing import Any

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
from ncclep import fp8
from ncclep.bench.timing import capture_graph
from ncclep.testing import COMBINE_TOLERANCE, ht_dispatch_difference, relative_error
from ncclep.workloads import make_routing

pytestmark = pytest.mark.gpu

EXPERTS, T, HIDDEN = 64, 2048, 2048


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


# (world, nodes) of the tests that run everywhere, with readable ids.
WORLDS = [
    pytest.param(1, 1, id="1gpu"),  # every message to itself: what a one-GPU host can check
    pytest.param(2, 1, id="2gpu"),
    pytest.param(4, 1, id="4gpu"),
    pytest.param(2, 2, id="2gpu-virtual2"),  # one rank per node: every forwarder is the destination
    pytest.param(4, 2, id="4gpu-virtual2"),
    pytest.param(8, 1, id="8gpu"),  # EP8: skipped on hosts with fewer GPUs
    pytest.param(8, 2, id="8gpu-virtual2"),
]
PEER_WORLDS = [p for p in WORLDS if p.values[0] > 1]  # tests of what one rank tells another


def _groups(
    experts: int = EXPERTS,
    tokens: int = T,
    hidden: int = HIDDEN,
    max_topk: int = 16,
    nodes: int = 1,
    num_sms: int | None = None,
) -> tuple[ncclep.Group, ncclep.Group]:
    with virtual_nodes(nodes):
        cuda = ncclep.Group(
            experts,
            tokens,
            hidden,
            mode="ht",
            max_topk=max_topk,
            backend="cuda",
            timeout_s=30.0,
            num_sms=num_sms,
        )
    assert cuda.native_info["node_size"] == dist.get_world_size() // nodes
    assert cuda.num_nodes == nodes
    ref = ncclep.Group(experts, tokens, hidden, mode="ht", max_topk=max_topk, backend="reference")
    return cuda, ref


def _random_x(g: torch.Generator, tokens: int, hidden: int) -> torch.Tensor:
    """bf16 rows of varied magnitude, no zeros."""
    scale = torch.rand(tokens, 1, generator=g) * 4 + 0.25
    x = torch.randn(tokens, hidden, generator=g) * scale
    return torch.where(x == 0, 0.5, x).to(torch.bfloat16)


def _inputs(
    g: torch.Generator,
    tokens: int,
    hidden: int,
    topk: int,
    routing: str,
    *,
    experts: int = EXPERTS,
    payload: str = "bf16",
    int32: bool = False,
    weights: bool = True,
) -> dict[str, Any]:
    """x (bf16, or fp8 with fp32 / UE8M0 scales), routing with masked entries and a few tokens
    routed nowhere, on the device."""
    dev = _device()
    x = _random_x(g, tokens, hidden)
    idx, w = make_routing(
        routing,
        tokens,
        experts,
        topk,
        world_size=dist.get_world_size(),
        generator=g,
        masked=3 if routing == "uniform" else 0,
        hot_rank=min(1, dist.get_world_size() - 1),
    )
    if routing == "uniform" and tokens > 4:
        idx[3::11] = -1
    scales = None
    if payload != "bf16":
        x, scales = fp8.quantize(x, ue8m0=payload == "ue8m0")
        scales = scales.to(dev)
    return {
        "x": x.to(dev),
        "x_scales": scales,
        "topk_idx": (idx.to(torch.int32) if int32 else idx).to(dev),
        "topk_weights": w.to(dev) if weights else None,
    }


def _check_pair(
    cuda: ncclep.Group,
    ref: ncclep.Group,
    inp: dict[str, Any],
    layout: str,
    alignment: int,
    g: torch.Generator,
    *,
    cached: bool = False,
) -> str | None:
    """Dispatch, combine (and optionally a cached dispatch) on both backends; what differs."""
    a = cuda.ht_dispatch(**inp, layout=layout, alignment=alignment)
    b = ref.ht_dispatch(**inp, layout=layout, alignment=alignment)
    problem = ht_dispatch_difference(a, b)
    dev = _device()
    rows, hidden = a.x.shape
    y = (torch.randn(rows, hidden, generator=g) * 2).to(torch.bfloat16).to(dev)
    w = torch.rand(rows, a.topk_idx.shape[1], generator=g).to(dev)
    out_a, w_a = cuda.ht_combine(y, a.handle, topk_weights=w)
    out_b, w_b = ref.ht_combine(y, b.handle, topk_weights=w)
    tokens = inp["x"].shape[0]
    if problem is None and tokens:
        err = relative_error(out_a, out_b)
        if err > COMBINE_TOLERANCE:
            problem = f"combine error {err:.3g}"
        elif w_a is None or w_b is None or relative_error(w_a, w_b) > 1e-5:
            problem = "combined weights differ"
    if problem is None and layout == "flat":  # the used rows only (the rest hold no token): the same sums
        n = int(a.num_recv[0])
        head, head_w = cuda.ht_combine(y[:n], a.handle, topk_weights=w[:n])
        if not (torch.equal(head, out_a) and head_w is not None and torch.equal(head_w, w_a)):
            problem = f"combine of the first {n} rows differs from the combine of all {rows}"
    if cached:
        for z in (_random_x(g, tokens, hidden), torch.rand(tokens, a.topk_idx.shape[1], generator=g)):
            z = z.to(dev)
            za = cuda.ht_dispatch_cached(z, a.handle)  # the eager path
            zb = torch.ops.ncclep.ht_dispatch_cached(ref.id, z, *b.handle.tensors()[:3])  # the op
            if problem is None and not torch.equal(za.view(torch.uint8), zb.view(torch.uint8)):
                problem = f"dispatch_cached ({z.dtype}) differs"
    return problem


def _matrix(seed: int, nodes: int = 1) -> list[str]:
    """Routings x top-k x layouts/alignments x payloads, token counts varying per rank and call."""
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(seed * 131 + rank)
    cuda, ref = _groups(nodes=nodes)
    layouts = [("flat", 1), ("expert_major", 1), ("expert_major", 16), ("expert_major", 128)]
    payloads = ["bf16", "fp8", "ue8m0"]
    sizes = [T, 0, 1, 777, 31, 1500]
    problems = []
    i = 0
    for routing in ("uniform", "skewed", "hot"):
        for topk in (1, 8, 16):
            if routing == "hot" and topk > EXPERTS // world:
                continue
            for layout, alignment in layouts:
                payload = payloads[i % 3]
                tokens = sizes[(i + rank) % len(sizes)]
                int32 = (i + i // len(layouts)) % 2 == 1  # every other call, each layout both ways
                inp = _inputs(
                    g, tokens, HIDDEN, topk, routing, payload=payload, int32=int32, weights=i % 4 != 3
                )
                problem = _check_pair(cuda, ref, inp, layout, alignment, g, cached=i % 3 == 0)
                if problem:
                    ids = "int32" if int32 else "int64"
                    problems.append(
                        f"{routing} k={topk} {layout}/{alignment} {payload} {ids} B={tokens}: {problem}"
                    )
                i += 1
    cuda.check()
    cuda.close()
    ref.close()
    return problems


@pytest.mark.parametrize("world,nodes", WORLDS)
def test_ht_matches_reference(world: int, nodes: int) -> None:
    for problems in gpu_pool(world).run(_matrix, world, nodes):
        assert problems == []


def _deepseek_shape(seed: int, nodes: int = 1) -> list[str]:
    """Hidden 7168, 256 experts, top-8, bf16 and fp8, both layouts."""
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(seed + rank)
    cuda, ref = _groups(experts=256, tokens=512, hidden=7168, max_topk=8, nodes=nodes)
    problems = []
    for payload, layout, alignment in (
        ("bf16", "flat", 1),
        ("fp8", "flat", 1),
        ("bf16", "expert_major", 128),
    ):
        tokens = (512, 300)[rank % 2]
        inp = _inputs(g, tokens, 7168, 8, "uniform", experts=256, payload=payload)
        problem = _check_pair(cuda, ref, inp, layout, alignment, g, cached=layout == "flat")
        if problem:
            problems.append(f"{payload} {layout}: {problem}")
    cuda.check()
    cuda.close()
    ref.close()
    return problems


@pytest.mark.parametrize("world,nodes", WORLDS)
def test_ht_deepseek_shape(world: int, nodes: int) -> None:
    for problems in gpu_pool(world).run(_deepseek_shape, 3, nodes):
        assert problems == []


def _largest_batch(seed: int, nodes: int = 1) -> list[str]:
    """8192 tokens on even ranks, 1 and 3000 on odd ones: the top of the issue's 1..8192 range."""
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(seed + rank)
    cuda, ref = _groups(tokens=8192, hidden=1024, max_topk=8, nodes=nodes)
    problems = []
    for call, (payload, layout, alignment) in enumerate(
        (("bf16", "flat", 1), ("fp8", "expert_major", 128), ("bf16", "expert_major", 16))
    ):
        tokens = 8192 if rank % 2 == 0 else (1, 3000)[call % 2]
        inp = _inputs(g, tokens, 1024, 8, "uniform", payload=payload)
        problem = _check_pair(cuda, ref, inp, layout, alignment, g, cached=call == 0)
        if problem:
            problems.append(f"{payload} {layout}/{alignment} B={tokens}: {problem}")
    cuda.check()
    cuda.close()
    ref.close()
    return problems


@pytest.mark.parametrize("world,nodes", WORLDS)
def test_ht_8192_tokens(world: int, nodes: int) -> None:
    for problems in gpu_pool(world).run(_largest_batch, 5, nodes):
        assert problems == []


def _layout_limits(seed: int, nodes: int = 1) -> list[str]:
    """The count kernel away from the DeepSeek shape: 2048 experts (two passes of its lane masks,
    over 48 KB of shared memory), 3 SMs (8 groups of 512 tokens on 3 blocks: a block counts several
    groups, and the last group is not block 0's), top-8 and top-24."""
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(seed + rank)
    experts = 2048
    cuda, ref = _groups(experts=experts, tokens=4096, hidden=256, max_topk=24, nodes=nodes, num_sms=3)
    problems = []
    calls = ((8, "flat", 1), (24, "expert_major", 16), (8, "flat", 1))
    for call, (topk, layout, alignment) in enumerate(calls):
        tokens = 4096 if (rank + call) % 2 == 0 else (3000, 1)[call % 2]
        inp = _inputs(g, tokens, 256, topk, "uniform", experts=experts, int32=call == 1)
        problem = _check_pair(cuda, ref, inp, layout, alignment, g)
        if problem:
            problems.append(f"k={topk} {layout}/{alignment} B={tokens}: {problem}")
    cuda.check()
    cuda.close()
    ref.close()
    return problems


@pytest.mark.parametrize("world,nodes", WORLDS)
def test_ht_layout_limits(world: int, nodes: int) -> None:
    for problems in gpu_pool(world).run(_layout_limits, 7, nodes):
        assert problems == []


def _expert_rows(rows: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, rank: int) -> torch.Tensor:
    local_w = torch.where(idx >= 0, weights, 0.0).sum(dim=1, keepdim=True)
    return (rows.float() * (0.5 + rank) + local_w).to(torch.bfloat16)


def _gradients(seed: int, nodes: int = 1) -> list[str]:
    """loss.backward() through dispatch -> experts -> combine on both backends: same gradients."""
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(seed * 17 + rank)
    cuda, ref = _groups(tokens=256, hidden=1024, max_topk=8, nodes=nodes)
    problems = []
    for layout, alignment in (("flat", 1), ("expert_major", 16)):
        for tokens in (256, 0 if rank == 1 else 100):
            inp = _inputs(g, tokens, 1024, 4, "uniform", int32=layout == "flat")
            gout = torch.randn(tokens, 1024, generator=g).to(_device())
            grads = []
            for group in (cuda, ref):
                x = inp["x"].clone().requires_grad_()
                w = inp["topk_weights"].clone().requires_grad_()
                out = group.ht_dispatch(x, inp["topk_idx"], w, layout=layout, alignment=alignment)
                rows = _expert_rows(out.x, out.topk_weights, out.topk_idx, rank)
                y, _ = group.ht_combine(rows, out.handle)
                (y.float() * gout).sum().backward()
                grads.append((x.grad, w.grad))
            (gx_a, gw_a), (gx_b, gw_b) = grads
            if tokens and (
                relative_error(gx_a, gx_b) > COMBINE_TOLERANCE
                or relative_error(gw_a, gw_b) > COMBINE_TOLERANCE
            ):
                problems.append(
                    f"{layout} B={tokens}: grad x {relative_error(gx_a, gx_b):.3g}, "
                    f"grad w {relative_error(gw_a, gw_b):.3g}"
                )
    cuda.check()
    cuda.close()
    ref.close()
    return problems


@pytest.mark.parametrize("world,nodes", WORLDS)
def test_ht_gradients_match_reference(world: int, nodes: int) -> None:
    for problems in gpu_pool(world).run(_gradients, 5, nodes):
        assert problems == []


def _many_iterations(count: int, nodes: int = 1) -> list[str]:
    """Consecutive dispatch/combine pairs, token counts, routing, layout and payload changing every call."""
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(7 + rank)
    cuda, ref = _groups(tokens=512, hidden=1024, max_topk=8, nodes=nodes)
    problems = []
    for i in range(count):
        tokens = int(torch.randint(0, 513, (1,), generator=g))
        routing = ("uniform", "skewed", "hot")[i % 3]
        layout, alignment = (("flat", 1), ("expert_major", 1), ("expert_major", 16))[i % 3 if i % 2 else 0]
        inp = _inputs(g, tokens, 1024, 8, routing, payload="fp8" if i % 5 == 1 else "bf16")
        problem = _check_pair(cuda, ref, inp, layout, alignment, g, cached=i % 7 == 0)
        # no break: every rank must make the same collective calls
        if problem and len(problems) < 5:
            problems.append(f"iteration {i} ({routing} {layout} B={tokens}): {problem}")
    cuda.check()
    cuda.close()
    ref.close()
    return problems


# The 2-GPU runs are the original intranode tests; the virtual-node one runs the hierarchical path.
LONG_WORLDS = [
    pytest.param(1, 1, id="1gpu"),  # every message to itself: what a one-GPU host can check
    pytest.param(2, 1, id="2gpu"),
    pytest.param(4, 2, id="4gpu-virtual2"),
    pytest.param(8, 2, id="8gpu-virtual2"),
]


@pytest.mark.parametrize("world,nodes", LONG_WORLDS)
def test_ht_500_iterations(world: int, nodes: int) -> None:
    for problems in gpu_pool(world).run(_many_iterations, 500, nodes):
        assert problems == []


def _graph_replays(replays: int, nodes: int = 1) -> list[str]:
    """dispatch -> stand-in experts -> combine captured once, replayed with new inputs."""
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(99 + rank)
    tokens, hidden = 512, 1024
    cuda, ref = _groups(tokens=tokens, hidden=hidden, max_topk=8, nodes=nodes)
    problems = []
    static = _inputs(g, tokens, hidden, 8, "uniform")
    scale = torch.linspace(0.5, 1.5, EXPERTS // world, device=_device())

    def experts(out: ncclep.HTDispatchOutput) -> torch.Tensor:
        first = out.topk_idx.max(dim=1).values.clamp_min(0)  # a per-row factor from its experts
        return (out.x.float() * scale[first].unsqueeze(1)).to(torch.bfloat16)

    def step() -> torch.Tensor:
        out = cuda.ht_dispatch(**static, layout="expert_major", alignment=16)
        return cuda.ht_combine(experts(out), out.handle)[0]

    graph, static_out = capture_graph(step)
    for i in range(replays):
        fresh = _inputs(g, tokens, hidden, 8, ("uniform", "skewed", "hot")[i % 3])
        for name in ("x", "topk_idx", "topk_weights"):
            static[name].copy_(fresh[name])
        graph.replay()
        if i % 10 == 0 or i == replays - 1:
            d = ref.ht_dispatch(**fresh, layout="expert_major", alignment=16)
            expected = ref.ht_combine(experts(d), d.handle)[0]
            err = relative_error(static_out, expected)
            if err > COMBINE_TOLERANCE and len(problems) < 5:
                problems.append(f"graph replay {i}: error {err:.3g}")
    cuda.check()
    cuda.close()
    ref.close()
    return problems


@pytest.mark.parametrize("world,nodes", LONG_WORLDS)
def test_ht_cuda_graph_replay(world: int, nodes: int) -> None:
    for problems in gpu_pool(world).run(_graph_replays, 100, nodes):
        assert problems == []


def _training_step_graph(replays: int, nodes: int = 1) -> list[str]:
    """A training step, dispatch -> experts -> combine -> loss.backward(), captured once and
    replayed on new inputs: the gradients of x and topk_weights match the reference's."""
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(123 + rank)
    tokens, hidden = (256, 100)[rank % 2], 1024
    cuda, ref = _groups(tokens=256, hidden=hidden, max_topk=8, nodes=nodes)
    problems = []
    dev = _device()

    def fresh_inputs(i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        inp = _inputs(g, tokens, hidden, 4, ("uniform", "skewed", "hot")[i % 3])
        gout = torch.randn(tokens, hidden, generator=g).to(dev)
        return inp["x"], inp["topk_idx"], inp["topk_weights"], gout

    def step(
        group: ncclep.Group, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, gout: torch.Tensor
    ) -> None:
        out = group.ht_dispatch(x, idx, w, layout="expert_major", alignment=16)
        y, _ = group.ht_combine(_expert_rows(out.x, out.topk_weights, out.topk_idx, rank), out.handle)
        (y.float() * gout).sum().backward()

    x0, idx0, w0, gout0 = fresh_inputs(0)
    static_x = x0.clone().requires_grad_()
    static_w = w0.clone().requires_grad_()
    static_idx, static_gout = idx0.clone(), gout0.clone()

    def captured_step() -> None:
        # The gradients the capture makes are the graph's: each replay rewrites them.
        static_x.grad, static_w.grad = None, None
        step(cuda, static_x, static_idx, static_w, static_gout)

    graph, _ = capture_graph(captured_step)
    assert static_x.grad is not None and static_w.grad is not None
    for i in range(1, replays + 1):
        x, idx, w, gout = fresh_inputs(i)
        with torch.no_grad():
            static_x.copy_(x)
            static_w.copy_(w)
        static_idx.copy_(idx)
        static_gout.copy_(gout)
        graph.replay()
        ref_x, ref_w = x.clone().requires_grad_(), w.clone().requires_grad_()
        step(ref, ref_x, idx, ref_w, gout)
        grads = (("x", static_x.grad, ref_x.grad), ("topk_weights", static_w.grad, ref_w.grad))
        for name, got, want in grads:
            err = relative_error(got, want)
            if err > COMBINE_TOLERANCE and len(problems) < 5:
                problems.append(f"replay {i}: grad {name} error {err:.3g}")
    cuda.check()
    cuda.close()
    ref.close()
    return problems


@pytest.mark.parametrize("world,nodes", LONG_WORLDS)
def test_ht_training_step_cuda_graph(world: int, nodes: int) -> None:
    for problems in gpu_pool(world).run(_training_step_graph, 20, nodes):
        assert problems == []


def _bad_expert() -> str:
    """An out-of-range expert id is reported on the next check; the group stays usable."""
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    cuda, ref = _groups(tokens=64, hidden=256, max_topk=8)
    inp = _inputs(g, 64, 256, 4, "uniform")
    if rank == 0:
        inp["topk_idx"][5, 1] = EXPERTS + 3
    cuda.ht_dispatch(**inp)
    result = "no error"
    try:
        cuda.check()
    except ncclep.InvalidArgument as exc:
        result = f"InvalidArgument: {exc}"
    inp["topk_idx"][inp["topk_idx"] >= EXPERTS] = -1
    problem = _check_pair(cuda, ref, inp, "flat", 1, g)
    cuda.check()
    cuda.close()
    ref.close()
    return f"{result} | after: {problem}"


def test_ht_bad_expert_reported() -> None:
    results = gpu_pool(2).run(_bad_expert)
    assert results[0].startswith("InvalidArgument") and str(EXPERTS + 3) in results[0], results[0]
    assert results[1].startswith("no error"), results[1]
    assert all(r.endswith("after: None") for r in results), results


def _skipped_call() -> str:
    """Rank 1 skips a dispatch: rank 0 must raise CommError naming it, within the timeout."""
    group = ncclep.Group(EXPERTS, 64, 256, mode="ht", backend="cuda", timeout_s=2.0)
    inp = _inputs(torch.Generator().manual_seed(dist.get_rank()), 16, 256, 4, "uniform")
    return peer_skips_a_call(group, lambda: group.ht_dispatch(**inp))


def test_ht_timeout_names_the_peer() -> None:
    assert_peer_timeout_reported(_skipped_call)


def _skipped_call_virtual() -> str:
    """The same on the hierarchical path (2 virtual nodes of one rank): the waits for the other
    node's counts, messages and done signals time out and name it."""
    with virtual_nodes(2):
        group = ncclep.Group(EXPERTS, 64, 256, mode="ht", backend="cuda", timeout_s=2.0)
    inp = _inputs(torch.Generator().manual_seed(dist.get_rank()), 16, 256, 4, "uniform")
    return peer_skips_a_call(group, lambda: group.ht_dispatch(**inp))


def test_ht_timeout_names_the_peer_virtual2() -> None:
    assert_peer_timeout_reported(_skipped_call_virtual)


BAD = 1  # the rank that rejects its arguments in the rejection tests


def _rejected_calls(nodes: int) -> list[str]:
    """Rank BAD rejects an HT dispatch (a token more than the group takes), then a combine (a row
    too many), then a cached dispatch (a row too few): it raises InvalidArgument at once; every
    other rank's call returns and its next call raises CommError(peer_rejected) naming rank BAD.
    After each, a dispatch + combine + cached dispatch on every rank matches the reference."""
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(17 + rank)
    tokens, hidden = 256, 512
    cuda, ref = _groups(tokens=tokens, hidden=hidden, max_topk=8, nodes=nodes)
    problems: list[str | None] = []
    inp = _inputs(g, tokens, hidden, 8, "uniform")

    def matches(what: str) -> None:
        problem = _check_pair(cuda, ref, inp, "expert_major", 16, g, cached=True)
        if problem:
            problems.append(f"{what}: {problem}")

    if rank == BAD:
        too_many = _inputs(g, tokens + 1, hidden, 8, "uniform")
        problems.append(own_rejection(lambda: cuda.ht_dispatch(**too_many), "tokens"))
    else:
        cuda.ht_dispatch(**inp)  # returns; its outputs lack rank BAD's tokens: discarded
        again = lambda: cuda.ht_dispatch(**inp)  # noqa: E731
        problems.append(peer_rejection(again, BAD, "tokens", "ht_dispatch receive"))
    matches("after the rejected dispatch")

    out = cuda.ht_dispatch(**inp)
    h = out.handle
    y = (torch.randn(out.x.shape, generator=g) * 2).to(torch.bfloat16).to(_device())
    if rank == BAD:
        # one row too many (fewer rows are allowed: the rows past them hold no token)
        problems.append(own_rejection(lambda: cuda.ht_combine(torch.cat([y, y[:1]]), h), "shape"))
    else:
        # a peer learns of a rejected combine when it sent tokens to the rejecting rank
        assert bool((h.send_pos[:, BAD] >= 0).any()), "the inputs route nothing to rank BAD"
        cuda.ht_combine(y, h)
        again = lambda: cuda.ht_combine(y, h)  # noqa: E731
        problems.append(peer_rejection(again, BAD, "shape", "ht_combine receive"))
    matches("after the rejected combine")

    out = cuda.ht_dispatch(**inp)
    h = out.handle
    z = inp["x"]

    def cached(rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.ncclep.ht_dispatch_cached(cuda.id, rows, h.send_pos, h.recv_slot, h.recv_counts)

    if rank == BAD:
        problems.append(own_rejection(lambda: cached(z[:-1].contiguous()), "shape"))
    else:
        # a peer learns of a rejected cached dispatch when the rejecting rank's tokens came to it
        assert bool((h.recv_slot // tokens == BAD).any()), "rank BAD routes nothing here"
        cached(z)
        problems.append(peer_rejection(lambda: cached(z), BAD, "shape", "ht_dispatch_cached receive"))
    matches("after the rejected cached dispatch")
    cuda.check()
    cuda.close()
    ref.close()
    return [p for p in problems if p]


@pytest.mark.parametrize("world,nodes", PEER_WORLDS)
def test_ht_rejected_call_reported_to_peers(world: int, nodes: int) -> None:
    for problems in gpu_pool(world).run(_rejected_calls, nodes):
        assert problems == []


def _timeout_then_new_group(nodes: int) -> str:
    """Rank 1 skips a dispatch: rank 0 raises CommError (timeout), then its next call CommError
    (broken) at once. Both ranks close the group and make a new one on the same process group,
    whose calls match the reference."""
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    with virtual_nodes(nodes):
        group = ncclep.Group(EXPERTS, 64, 256, mode="ht", backend="cuda", timeout_s=2.0)
    inp = _inputs(g, 16, 256, 4, "uniform")
    seen = peer_skips_a_call(group, lambda: group.ht_dispatch(**inp))
    if rank == 0:
        try:
            group.ht_dispatch(**inp)
            seen += " | next call: no error"
        except ncclep.CommError as exc:
            seen += f" | next call: {exc.reason}"
    group.close()
    cuda, ref = _groups(tokens=64, hidden=256, max_topk=8, nodes=nodes)
    problem = _check_pair(cuda, ref, inp, "flat", 1, g, cached=True)
    cuda.check()
    cuda.close()
    ref.close()
    return f"{seen} | new group: {problem}"


@pytest.mark.parametrize("nodes", [1, 2])
def test_ht_timeout_then_close_and_new_group(nodes: int) -> None:
    results = run_isolated(2, _timeout_then_new_group, nodes)
    assert results[0].startswith("CommError peer=1") and "next call: broken" in results[0], results[0]
    assert results[1].startswith("skipped"), results[1]
    assert all(r.endswith("new group: None") for r in results), results
