"""ncclep.deep_ep's LL ops checked the way DeepEP's tests/test_low_latency.py checks DeepEP, in our
words: received counts per expert (and the cumulative statistics), the tokens each expert got from
each rank, fp8 casting (per-128 scales, powers of two, packed UE8M0) in DeepEP's layouts, the
combine as the weighted sum of the experts' rows, hook mode, ``out=`` and zero-copy combine.
2 and 4 gloo processes, reference backend.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from helpers import check_close, expert_factor, gather_objects, generator, random_x, rank_and_world, step

from ncclep import InvalidArgument, deep_ep, fp8

T = 12  # num_max_dispatch_tokens_per_rank
HIDDEN = 512  # a multiple of 512: UE8M0 packing
TOPK = 4
EXPERTS = {2: 16, 4: 32}
# (use_fp8, round_scale, use_ue8m0): bf16; fp8 with fp32 scales; powers of two as fp32; packed UE8M0
PRECISIONS = [(False, False, False), (True, False, False), (True, True, False), (True, True, True)]


def tokens_of(rank: int, world: int) -> int:
    """Tokens each rank dispatches: varied, and none at all on rank 1 of four."""
    return 0 if (world == 4 and rank == 1) else T - 2 * rank


def make_buffer(world: int) -> deep_ep.Buffer:
    hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(T, HIDDEN, world, EXPERTS[world])
    return deep_ep.Buffer(
        dist.group.WORLD,
        num_rdma_bytes=hint,
        low_latency_mode=True,
        num_qps_per_rank=EXPERTS[world] // world,
        explicitly_destroy=True,
    )


def inputs(salt: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, H] bf16, topk_idx [B, K] int64 with some -1 (whose weights are nonzero and must be
    ignored), topk_weights [B, K] fp32."""
    rank, world = rank_and_world()
    g = generator(salt)
    tokens = tokens_of(rank, world)
    x = random_x(tokens, HIDDEN, g)
    idx = torch.rand(tokens, EXPERTS[world], generator=g).topk(TOPK, dim=1).indices
    if tokens:
        idx.view(-1)[torch.randperm(idx.numel(), generator=g)[:3]] = -1
    weights = torch.rand(tokens, TOPK, generator=g) + 0.25
    return x, idx, weights


def expected_rows(all_idx: list[torch.Tensor], expert: int) -> list[tuple[int, int]]:
    """(source rank, token) of each row expert ``expert`` receives, in ncclep's order."""
    return [
        (src, b) for src, idx in enumerate(all_idx) for b in range(idx.shape[0]) if expert in idx[b].tolist()
    ]


def slot_on(idx: torch.Tensor, token: int, rank: int, local: int) -> int:
    """The slot of ``token`` among the tokens of its rank that go to ``rank``."""
    going = [b for b in range(idx.shape[0]) if any(e >= 0 and e // local == rank for e in idx[b].tolist())]
    return going.index(token)


def expected_scales(
    x_rows: torch.Tensor, round_scale: bool, use_ue8m0: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 rows, scales as DeepEP hands them: fp32, fp32 powers of two, or packed int32)."""
    q, s = fp8.quantize(x_rows, ue8m0=round_scale)
    if use_ue8m0:
        return q, s.view(torch.uint8).view(torch.int32)
    return q, fp8.scales_to_float(s)


def check_received(
    recv: Any,
    count: torch.Tensor,
    handle: Any,
    all_x: list[torch.Tensor],
    all_idx: list[torch.Tensor],
    precision: tuple[bool, bool, bool],
) -> int:
    rank, world = rank_and_world()
    local = EXPERTS[world] // world
    use_fp8, round_scale, use_ue8m0 = precision
    rows = world * T
    assert count.dtype == torch.int32 and tuple(count.shape) == (local,)
    if use_fp8:
        x_rows, scales = recv
        assert x_rows.dtype == torch.float8_e4m3fn and tuple(x_rows.shape) == (local, rows, HIDDEN)
        columns = HIDDEN // 512 if use_ue8m0 else HIDDEN // 128
        assert scales.dtype == (torch.int32 if use_ue8m0 else torch.float32), scales.dtype
        assert tuple(scales.shape) == (local, rows, columns), scales.shape
        assert scales.transpose(1, 2).is_contiguous(), f"scales not column-major: {scales.stride()}"
    else:
        assert recv.dtype == torch.bfloat16 and tuple(recv.shape) == (local, rows, HIDDEN)
    src_info, layout_range = handle[0], handle[1]
    assert (handle[2], handle[3], handle[4]) == (T, HIDDEN, EXPERTS[world])
    assert src_info.dtype == torch.int32 and tuple(src_info.shape) == (local, rows)
    assert layout_range.dtype == torch.int64 and tuple(layout_range.shape) == (local, world)
    checked = 0
    for e in range(local):
        expert = rank * local + e
        want = expected_rows(all_idx, expert)
        n = int(count[e])
        assert n == len(want), f"expert {expert}: {n} rows, expected {len(want)}"
        begins, counts = (layout_range[e] >> 32).tolist(), (layout_range[e] & 0xFFFFFFFF).tolist()
        assert sum(counts) == n
        for src in range(world):
            assert counts[src] == int((all_idx[src] == expert).sum()), (expert, src, counts)
            assert begins[src] == sum(counts[:src])
        assert src_info[e, :n].tolist() == [slot_on(all_idx[s], b, rank, local) for s, b in want]
        if not n:
            continue
        tokens = torch.stack([all_x[s][b] for s, b in want])
        if use_fp8:
            q, s = expected_scales(tokens, round_scale, use_ue8m0)
            assert torch.equal(recv[0][e, :n].view(torch.uint8), q.view(torch.uint8)), (
                f"expert {expert} fp8 rows"
            )
            assert torch.equal(recv[1][e, :n], s), f"expert {expert} scales"
        else:
            assert torch.equal(recv[e, :n].view(torch.int16), tokens.view(torch.int16)), (
                f"expert {expert} rows"
            )
        checked += n
    return checked


def dispatch_worker() -> dict[str, int]:
    _, world = rank_and_world()
    local = EXPERTS[world] // world
    buffer = make_buffer(world)
    x, idx, _ = inputs(1)
    all_x, all_idx = gather_objects(x), gather_objects(idx)
    checked = {}
    for precision in PRECISIONS:
        use_fp8, round_scale, use_ue8m0 = precision
        for hook in (False, True):
            stats = torch.zeros(local, dtype=torch.int32)
            for _ in range(2):  # twice: the statistics accumulate
                recv, count, handle, event, receive = buffer.low_latency_dispatch(
                    x,
                    idx,
                    T,
                    EXPERTS[world],
                    cumulative_local_expert_recv_stats=stats,
                    use_fp8=use_fp8,
                    round_scale=round_scale,
                    use_ue8m0=use_ue8m0,
                    async_finish=not hook,
                    return_recv_hook=hook,
                )
                assert (receive is not None) == hook
                if hook:
                    assert event.event is None
                    receive()
                    receive()  # a second call does nothing
                else:
                    event.current_stream_wait()  # the CPU's event has already passed
            assert torch.equal(stats, 2 * count), (stats, count)
            key = f"fp8={use_fp8} round={round_scale} ue8m0={use_ue8m0} hook={hook}"
            checked[key] = step(check_received, recv, count, handle, all_x, all_idx, precision)
    buffer.destroy()
    return checked


def expert_rows(recv: Any, count: torch.Tensor, precision: tuple[bool, bool, bool]) -> torch.Tensor:
    """What the experts return: each local expert e scales its dequantised rows by its factor;
    padding rows are left as they are (the combine must not read them)."""
    rank, world = rank_and_world()
    local = EXPERTS[world] // world
    use_fp8, _, use_ue8m0 = precision
    if use_fp8:
        q, s = recv
        s = s.contiguous()
        if use_ue8m0:
            s = s.view(torch.uint8).view(fp8.UE8M0_DTYPE)
        values = fp8.dequantize(q, s)
    else:
        values = recv.float()
    factors = torch.stack([expert_factor(rank * local + e, EXPERTS[world]) for e in range(local)])
    return (values * factors.view(local, 1, 1)).to(torch.bfloat16)


def expected_combine(
    x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, precision: tuple[bool, bool, bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_k w[b,k] · factor(e_k) · x̂[b] (x̂: x as the experts saw it), and Σ of the terms' |.|."""
    use_fp8, round_scale, _ = precision
    seen = x.float()
    if use_fp8 and x.shape[0]:
        seen = fp8.dequantize(*fp8.quantize(x, ue8m0=round_scale))
    world = dist.get_world_size()
    factor = torch.where(idx >= 0, (idx + 1).float() / EXPERTS[world], 0.0)
    scale = (weights * factor).sum(dim=1, keepdim=True)
    return seen * scale, seen.abs() * (weights * factor).abs().sum(dim=1, keepdim=True)


def combine_worker() -> list[str]:
    _, world = rank_and_world()
    buffer = make_buffer(world)
    x, idx, weights = inputs(2)
    done = []
    for precision in PRECISIONS[:2] + PRECISIONS[3:]:
        use_fp8, round_scale, use_ue8m0 = precision
        flags = dict(use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0)
        ref, ref_abs = expected_combine(x, idx, weights, precision)

        # weights given only to the combine: they travel to the expert ranks first
        recv, count, handle, _, _ = buffer.low_latency_dispatch(x, idx, T, EXPERTS[world], **flags)
        rows = expert_rows(recv, count, precision)
        y, event, hook = buffer.low_latency_combine(rows, idx, weights, handle)
        assert hook is None and event.event is None
        assert y.dtype == torch.bfloat16 and tuple(y.shape) == (x.shape[0], HIDDEN)
        step(check_close, y, ref, ref_abs, f"{precision} combine")

        # out=, async_finish: written in place and returned
        out = torch.full_like(x, float("nan"))
        y, event, _ = buffer.low_latency_combine(rows, idx, weights, handle, out=out, async_finish=True)
        event.current_stream_wait()
        assert y is out
        step(check_close, out, ref, ref_abs, f"{precision} combine out=")

        # zero copy: the rows come from the combine buffer; x is only a shape
        staging = buffer.get_next_low_latency_combine_buffer(handle)
        assert staging.dtype == torch.bfloat16 and staging.shape == rows.shape
        staging.copy_(rows)
        y, _, _ = buffer.low_latency_combine(torch.zeros_like(rows), idx, weights, handle, zero_copy=True)
        step(check_close, y, ref, ref_abs, f"{precision} zero-copy combine")

        # hook mode on both ops: placeholders until the hooks run
        recv, count, handle, _, receive = buffer.low_latency_dispatch(
            x, idx, T, EXPERTS[world], return_recv_hook=True, **flags
        )
        receive()
        rows = expert_rows(recv, count, precision)
        y, _, finish = buffer.low_latency_combine(rows, idx, weights, handle, return_recv_hook=True)
        assert finish is not None and tuple(y.shape) == (x.shape[0], HIDDEN)
        finish()
        step(check_close, y, ref, ref_abs, f"{precision} hooked combine")
        done.append(str(precision))

    # views (vLLM passes the expert ids so): copied first, same result
    recv_view, count_view, _, _, _ = buffer.low_latency_dispatch(
        x.t().contiguous().t(), idx.t().contiguous().t(), T, EXPERTS[world], use_fp8=False
    )
    recv_same, count_same, _, _, _ = buffer.low_latency_dispatch(x, idx, T, EXPERTS[world], use_fp8=False)
    assert torch.equal(count_view, count_same)
    assert all(torch.equal(recv_view[e, :n], recv_same[e, :n]) for e, n in enumerate(count_same.tolist()))

    # weights given to the dispatch too (ncclep's extension): the combine skips the exchange
    recv, count, handle, _, _ = buffer.low_latency_dispatch(
        x, idx, T, EXPERTS[world], use_fp8=False, topk_weights=weights
    )
    assert handle.carries(weights)
    rows = expert_rows(recv, count, PRECISIONS[0])
    ref, ref_abs = expected_combine(x, idx, weights, PRECISIONS[0])
    y, _, _ = buffer.low_latency_combine(rows, idx, weights, handle)
    step(check_close, y, ref, ref_abs, "combine with the dispatch's weights")
    # ... unless the combine's weights are another tensor, or were changed in place since
    other = weights.flip(1).contiguous()
    assert not handle.carries(other)
    ref2, ref2_abs = expected_combine(x, idx, other, PRECISIONS[0])
    y, _, _ = buffer.low_latency_combine(rows, idx, other, handle)
    step(check_close, y, ref2, ref2_abs, "combine with other weights")
    weights.mul_(2)
    assert not handle.carries(weights)
    y, _, _ = buffer.low_latency_combine(rows, idx, weights, handle)
    step(check_close, y, 2 * ref, 2 * ref_abs, "combine with weights changed since the dispatch")
    buffer.destroy()
    return done


def refusals_worker() -> list[str]:
    """Local argument checks: every rank raises the same InvalidArgument before any collective."""
    _, world = rank_and_world()
    experts = EXPERTS[world]
    x, idx, weights = inputs(3)
    seen = []

    def refused(match: str, call: Any) -> None:
        with pytest.raises(InvalidArgument, match=match):
            call()
        seen.append(match)

    small = deep_ep.Buffer(dist.group.WORLD, num_rdma_bytes=4096, low_latency_mode=True)
    refused("get_low_latency_rdma_size_hint", lambda: small.low_latency_dispatch(x, idx, T, experts))
    refused("get_low_latency_rdma_size_hint", lambda: small.clean_low_latency_buffer(T, HIDDEN, experts))
    ht_only = deep_ep.Buffer(dist.group.WORLD, num_nvl_bytes=1 << 20, num_rdma_bytes=1 << 30)
    refused("low_latency_mode", lambda: ht_only.low_latency_dispatch(x, idx, T, experts))
    buffer = make_buffer(world)
    buffer.clean_low_latency_buffer(T, HIDDEN, experts)  # fits: nothing to clean
    stats = torch.zeros(1, dtype=torch.int64)
    refused(
        "dispatch_wait_recv_cost_stats", lambda: buffer.low_latency_dispatch(x, idx, T, experts, None, stats)
    )
    refused(
        "cumulative_local_expert_recv_stats", lambda: buffer.low_latency_dispatch(x, idx, T, experts, stats)
    )
    refused("round_scale", lambda: buffer.low_latency_dispatch(x, idx, T, experts, use_ue8m0=True))
    refused(
        "return_recv_hook",
        lambda: buffer.low_latency_dispatch(x, idx, T, experts, async_finish=True, return_recv_hook=True),
    )
    refused("num_experts", lambda: buffer.low_latency_dispatch(x, idx, T, experts + 1))
    refused("enable_shrink", lambda: buffer.low_latency_update_mask_buffer(0, True))
    refused(
        "enable_shrink", lambda: buffer.low_latency_query_mask_buffer(torch.zeros(world, dtype=torch.int32))
    )
    refused("enable_shrink", lambda: deep_ep.Buffer(dist.group.WORLD, enable_shrink=True))
    recv, _, handle, _, _ = buffer.low_latency_dispatch(x, idx, T, experts, use_fp8=False)
    rows = recv.clone()
    refused("use_logfmt", lambda: buffer.low_latency_combine(rows, idx, weights, handle, use_logfmt=True))
    refused(
        "combine_wait_recv_cost_stats",
        lambda: buffer.low_latency_combine(rows, idx, weights, handle, combine_wait_recv_cost_stats=stats),
    )
    refused("topk_weights", lambda: buffer.low_latency_combine(rows, idx, weights[:, :1], handle))
    refused(
        "zero_copy",
        lambda: make_buffer(world).low_latency_combine(rows, idx, weights, handle, zero_copy=True),
    )
    _, _, pending, _, _ = buffer.low_latency_dispatch(
        x, idx, T, experts, use_fp8=False, return_recv_hook=True
    )
    refused("hook", lambda: buffer.low_latency_combine(rows, idx, weights, pending))
    buffer.destroy()
    with pytest.raises(Exception, match="destroyed"):
        buffer.low_latency_dispatch(x, idx, T, experts)
    return seen


@pytest.mark.parametrize("world_name", ["world2", "world4"])
def test_ll_dispatch_counts_tokens_and_fp8_layouts(world_name: str, request: pytest.FixtureRequest) -> None:
    results = request.getfixturevalue(world_name).run(dispatch_worker)
    assert len(results[0]) == 2 * len(PRECISIONS)
    assert sum(results[0].values()) > 0


@pytest.mark.parametrize("world_name", ["world2", "world4"])
def test_ll_combine_is_the_weighted_sum(world_name: str, request: pytest.FixtureRequest) -> None:
    results = request.getfixturevalue(world_name).run(combine_worker)
    assert len(results[0]) == 3


def test_ll_refusals(world2: Any) -> None:
    seen = world2.run(refusals_worker)
    assert len(seen[0]) == 16


def early_outputs_worker() -> dict[str, int]:
    """Hook mode where the send half allocates the outputs, as ncclep's CUDA backend does
    (``Pending.early``): the call returns those tensors at once, the hook fills them, and they pass
    the same checks as a hooked call on placeholders. Simulated on the reference backend, whose send
    half here runs the whole op and exposes its result early."""
    from ncclep.reference.ll import ReferenceLL

    real = (
        ReferenceLL.dispatch_send,
        ReferenceLL.dispatch_recv,
        ReferenceLL.combine_send,
        ReferenceLL.combine_recv,
    )

    sent: list[Any] = []

    class Sent:
        def __init__(self, out: Any) -> None:
            self.early = out
            sent.append(out)

    ReferenceLL.dispatch_send = lambda self, *args: Sent(real[1](self, real[0](self, *args)))  # type: ignore[method-assign]
    ReferenceLL.dispatch_recv = lambda self, state: state.early  # type: ignore[method-assign]
    ReferenceLL.combine_send = lambda self, *args: Sent(real[3](self, real[2](self, *args)))  # type: ignore[method-assign]
    ReferenceLL.combine_recv = lambda self, state, out=None: state.early  # type: ignore[method-assign]
    try:
        _, world = rank_and_world()
        buffer = make_buffer(world)
        x, idx, weights = inputs(2)
        all_x, all_idx = gather_objects(x), gather_objects(idx)
        checked = {}
        for precision in PRECISIONS:
            use_fp8, round_scale, use_ue8m0 = precision
            flags = dict(use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0)
            recv, count, handle, _, receive = buffer.low_latency_dispatch(
                x, idx, T, EXPERTS[world], return_recv_hook=True, **flags
            )
            first = recv[0] if use_fp8 else recv
            assert first is sent[-1].x, "the dispatch returns the send half's tensors"
            receive()
            out = handle.routing
            assert out is not None
            key = f"fp8={use_fp8} round={round_scale} ue8m0={use_ue8m0}"
            checked[key] = step(check_received, recv, count, handle, all_x, all_idx, precision)
            assert (recv[0] if use_fp8 else recv) is first, "the early tensors are the results"

            rows = expert_rows(recv, count, precision)
            y, _, finish = buffer.low_latency_combine(rows, idx, weights, handle, return_recv_hook=True)
            assert y is sent[-1], "the combine returns the send half's tensor"
            finish()
            ref, ref_abs = expected_combine(x, idx, weights, precision)
            step(check_close, y, ref, ref_abs, f"{precision} hooked combine, early output")
        buffer.destroy()
        return checked
    finally:
        (
            ReferenceLL.dispatch_send,
            ReferenceLL.dispatch_recv,
            ReferenceLL.combine_send,
            ReferenceLL.combine_recv,
        ) = real  # type: ignore[method-assign]


def test_ll_hook_with_outputs_from_the_send_half(world2: Any) -> None:
    results = world2.run(early_outputs_worker)
    assert len(results[0]) == len(PRECISIONS) and sum(results[0].values()) > 0
