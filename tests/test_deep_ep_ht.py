"""ncclep.deep_ep's HT ops checked the way DeepEP's tests/test_intranode.py checks DeepEP, in our
words: the layout (tokens per rank and per expert, ``is_token_in_rank``), the exact-size dispatch
(rows, per-expert list, ``rank_prefix_matrix``, received ids and weights), ``num_worst_tokens``,
the cached dispatch, fp8 payloads (fp32 scales in any layout, packed UE8M0), combine equal to x
times the ranks a token went to, the combined weights, bias, events, the HT group growing with the
calls, and autograd through the shim. 2 and 4 gloo processes, reference backend.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from helpers import gather_objects, generator, random_x, rank_and_world, step

from ncclep import InvalidArgument, deep_ep, fp8

HIDDEN = 512  # a multiple of 512: packed UE8M0 scales
TOPK = 4
EXPERTS = {2: 16, 4: 32}


def tokens_of(rank: int, world: int, scale: int = 1) -> int:
    return scale * (24 - 3 * rank) if not (world == 4 and rank == 2) else 0  # rank 2 of 4 sends nothing


def make_buffer(**kwargs: Any) -> deep_ep.Buffer:
    hidden_bytes = HIDDEN * 2
    nvl = deep_ep.Config().get_nvl_buffer_size_hint(hidden_bytes, dist.get_world_size())
    return deep_ep.Buffer(dist.group.WORLD, nvl, 0, explicitly_destroy=True, **kwargs)


def inputs(salt: int, scale: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rank, world = rank_and_world()
    g = generator(salt)
    tokens = tokens_of(rank, world, scale)
    x = random_x(tokens, HIDDEN, g)
    idx = torch.rand(tokens, EXPERTS[world], generator=g).topk(TOPK, dim=1).indices
    if tokens:
        idx.view(-1)[torch.randperm(idx.numel(), generator=g)[:5]] = -1
    return x, idx, torch.rand(tokens, TOPK, generator=g) + 0.25


def expected_layout(idx: torch.Tensor, experts: int, world: int) -> tuple[list[int], list[int], torch.Tensor]:
    local = experts // world
    per_expert = [int((idx == e).sum()) for e in range(experts)]
    in_rank = torch.zeros(idx.shape[0], world, dtype=torch.bool)
    for b in range(idx.shape[0]):
        for e in idx[b].tolist():
            if e >= 0:
                in_rank[b, e // local] = True
    return in_rank.sum(dim=0).tolist(), per_expert, in_rank


def check_layout(buffer: deep_ep.Buffer, idx: torch.Tensor) -> tuple[Any, ...]:
    _, world = rank_and_world()
    layout = buffer.get_dispatch_layout(idx, EXPERTS[world])
    per_rank, per_rdma, per_expert, in_rank, event = layout
    want_rank, want_expert, want_in_rank = expected_layout(idx, EXPERTS[world], world)
    assert per_rank.dtype == torch.int32 and per_rank.tolist() == want_rank
    assert per_expert.dtype == torch.int32 and per_expert.tolist() == want_expert
    assert in_rank.dtype == torch.bool and torch.equal(in_rank, want_in_rank)
    assert per_rdma is None  # one host
    assert event.event is None
    return layout


def check_dispatch(
    out: tuple[Any, ...],
    x: Any,
    idx: torch.Tensor | None,
    weights: torch.Tensor | None,
    all_x: list[Any],
    all_idx: list[torch.Tensor],
    alignment: int,
) -> None:
    """Rows from each rank in token order, the per-expert list, rank_prefix_matrix, ids, weights."""
    rank, world = rank_and_world()
    local = EXPERTS[world] // world
    recv_x, recv_idx, recv_w, per_expert, handle, _ = out
    senders = [
        [b for b in range(i.shape[0]) if any(e >= 0 and e // local == rank for e in i[b].tolist())]
        for i in all_idx
    ]
    n = sum(len(s) for s in senders)
    fp8_x = isinstance(x, tuple)
    rows = recv_x[0] if fp8_x else recv_x
    assert rows.shape[0] == n and rows.shape[1] == HIDDEN, (rows.shape, n)
    prefix = handle[0]
    assert prefix.dtype == torch.int32 and tuple(prefix.shape) == (world, world)
    assert prefix[:, rank].tolist() == torch.tensor([len(s) for s in senders]).cumsum(0).tolist()
    assert torch.equal(handle[4], out[4].is_token_in_rank)
    start = 0
    for src, tokens in enumerate(senders):
        for j, b in enumerate(tokens):
            r = start + j
            if fp8_x:
                assert torch.equal(recv_x[0][r].view(torch.uint8), all_x[src][0][b].view(torch.uint8))
                assert torch.equal(recv_x[1][r], all_x[src][1][b]), (src, b)
            else:
                assert torch.equal(recv_x[r].view(torch.int16), all_x[src][b].view(torch.int16)), (src, b)
            if recv_idx is not None:
                global_ids = all_idx[src][b]
                mine = (global_ids >= 0) & (global_ids // local == rank)
                assert recv_idx[r].tolist() == torch.where(mine, global_ids - rank * local, -1).tolist()
        start += len(tokens)
    counts = [sum(int((i == rank * local + e).sum()) for i in all_idx) for e in range(local)]
    assert per_expert == [(c + alignment - 1) // alignment * alignment for c in counts]
    if recv_idx is None:
        assert recv_w is None
        return
    assert recv_idx.dtype == idx.dtype == torch.int64 and recv_w is not None
    for e, c in enumerate(counts):
        assert int((recv_idx == e).sum()) == c
    all_w = gather_objects(weights)
    start = 0
    for src, tokens in enumerate(senders):
        for j, b in enumerate(tokens):
            want = torch.where(recv_idx[start + j] >= 0, all_w[src][b], 0.0)
            assert torch.equal(recv_w[start + j], want)
        start += len(tokens)


def check_combine(
    buffer: deep_ep.Buffer, out: tuple[Any, ...], x: torch.Tensor, idx: torch.Tensor, weights: Any
) -> None:
    """Identity experts: each token comes back once per rank it went to; the weights of its valid
    choices come back as they were (each choice is kept by one rank only), 0 for the others."""
    _, world = rank_and_world()
    in_rank = expected_layout(idx, EXPERTS[world], world)[2]
    recv_x, _, recv_w, _, handle, _ = out
    y, y_w, event = buffer.combine(recv_x, handle, topk_weights=recv_w, async_finish=True)
    event.current_stream_wait()
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    times = in_rank.sum(dim=1, keepdim=True).float()
    assert torch.equal(y.float(), (x.float() * times).to(torch.bfloat16).float())  # exact: small multiples
    if recv_w is not None:
        assert y_w is not None and torch.equal(y_w, torch.where(idx >= 0, weights, 0.0))
    else:
        assert y_w is None


def fp8_payload(x: torch.Tensor, packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x quantised; fp32 scales column-major (any layout is accepted), or UE8M0 packed as int32."""
    q, s = fp8.quantize(x, ue8m0=packed)
    if packed:
        return q, s.view(torch.uint8).view(torch.int32)
    return q, s.t().contiguous().t()


def gather_payload(payload: Any) -> list[Any]:
    """Every rank's payload (fp8 travels as bytes: fp8 tensors do not pickle)."""
    if not isinstance(payload, tuple):
        return gather_objects(payload)
    gathered = gather_objects((payload[0].view(torch.uint8), payload[1].contiguous()))
    return [(q.view(torch.float8_e4m3fn), s) for q, s in gathered]


def dispatch_worker() -> int:
    _, world = rank_and_world()
    buffer = make_buffer()
    x, idx, weights = inputs(1)
    layout = step(check_layout, buffer, idx)
    per_rank, _, per_expert, in_rank, _ = layout
    all_idx = gather_objects(idx)
    payloads = {"bf16": x, "fp8": fp8_payload(x, False), "fp8-ue8m0": fp8_payload(x, True)}
    checks = 0
    for name, payload in payloads.items():
        all_payload = gather_payload(payload)
        for with_topk in (False, True):
            for previous in (False, True):
                alignment = 4 if with_topk else 1
                common = dict(
                    num_tokens_per_rank=per_rank,
                    is_token_in_rank=in_rank,
                    num_tokens_per_expert=per_expert,
                    config=deep_ep.Buffer.get_dispatch_config(world),
                    expert_alignment=alignment,
                    previous_event=buffer.capture() if previous else None,
                    async_finish=previous,
                )
                topk = dict(topk_idx=idx, topk_weights=weights) if with_topk else {}
                out = buffer.dispatch(payload, **common, **topk)
                if previous:
                    out[5].current_stream_wait()
                step(
                    check_dispatch,
                    out,
                    payload,
                    idx if with_topk else None,
                    weights,
                    all_payload,
                    all_idx,
                    alignment,
                )

                # num_worst_tokens: that many rows, the exact ones first, -1 ids after; no list
                if with_topk:
                    worst = 24 * world
                    again = buffer.dispatch(payload, **common, **topk, num_worst_tokens=worst)
                    n = (out[0][0] if name != "bf16" else out[0]).shape[0]
                    worst_x = again[0][0] if name != "bf16" else again[0]
                    assert (
                        worst_x.shape[0] == worst
                        and again[1].shape[0] == worst
                        and again[2].shape[0] == worst
                    )
                    assert again[3] == []
                    assert torch.equal(
                        worst_x[:n].view(torch.uint8),
                        (out[0][0] if name != "bf16" else out[0]).view(torch.uint8),
                    )
                    assert torch.equal(again[1][:n], out[1]) and bool((again[1][n:] == -1).all())
                    assert torch.equal(again[2][:n], out[2]) and bool((again[2][n:] == 0).all())
                    with pytest.raises(InvalidArgument, match="num_worst_tokens"):
                        again[4][0]
                    if name == "bf16":
                        step(check_combine, buffer, again, x, idx, weights)

                # cached dispatch: the same rows again, along the handle
                cached = buffer.dispatch(payload, handle=out[4], previous_event=common["previous_event"])
                assert cached[1:5] == (None, None, None, None)
                if name == "bf16":
                    assert torch.equal(cached[0], out[0])
                    step(check_combine, buffer, out, x, idx, weights if with_topk else None)
                else:
                    assert torch.equal(cached[0][0].view(torch.uint8), out[0][0].view(torch.uint8))
                    assert torch.equal(cached[0][1], out[0][1]) and cached[0][1].dtype == out[0][1].dtype
                checks += 1
    buffer.destroy()
    return checks


def close(y: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Within two bf16 roundings."""
    assert torch.allclose(y.float(), ref, rtol=2**-7, atol=2**-6), f"{what}: {(y.float() - ref).abs().max()}"


def combine_extras_worker() -> str:
    """Bias, the group growing with the calls (older handles still combine), refusals."""
    _, world = rank_and_world()
    buffer = make_buffer(backend="reference")
    x, idx, weights = inputs(2)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, EXPERTS[world])
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    first = buffer.dispatch(x, **layout, topk_idx=idx, topk_weights=weights)
    assert len(buffer.groups) == 1 and buffer.groups[0].max_tokens_per_rank == 128
    bias = (torch.ones_like(x), torch.full_like(x, 0.5))
    y, _, _ = buffer.combine(first[0], first[4], bias=bias)
    times = in_rank.sum(dim=1, keepdim=True).float()
    step(close, y, x.float() * times + 1.5, "combine with bias")

    big_x, big_idx, big_w = inputs(3, scale=8)  # up to 192 tokens a rank: the group grows to 256
    big_layout = buffer.get_dispatch_layout(big_idx, EXPERTS[world])
    big = buffer.dispatch(
        big_x,
        num_tokens_per_rank=big_layout[0],
        is_token_in_rank=big_layout[3],
        num_tokens_per_expert=big_layout[2],
        topk_idx=big_idx,
        topk_weights=big_w,
    )
    assert len(buffer.groups) == 2 and buffer.groups[0].max_tokens_per_rank == 256, buffer.groups
    y, _, _ = buffer.combine(big[0], big[4])
    assert torch.equal(
        y.float(), (big_x.float() * big_layout[3].sum(dim=1, keepdim=True)).to(torch.bfloat16).float()
    )
    y, _, _ = buffer.combine(first[0], first[4])  # the first group is still open for its handles
    assert torch.equal(y.float(), (x.float() * times).to(torch.bfloat16).float())

    with pytest.raises(InvalidArgument, match="rows"):
        buffer.combine(first[0][:-1] if first[0].shape[0] else torch.empty(1, HIDDEN), first[4])
    with pytest.raises(InvalidArgument, match="num_tokens_per_rank"):
        buffer.dispatch(x, topk_idx=idx)
    with pytest.raises(InvalidArgument, match="cached dispatch"):
        buffer.dispatch(x, handle=first[4], topk_idx=idx)
    with pytest.raises(InvalidArgument, match="allocate_on_comm_stream"):
        buffer.dispatch(x, **layout, allocate_on_comm_stream=True)
    with pytest.raises(InvalidArgument, match="x_scales"):
        buffer.dispatch((fp8.quantize(x)[0], torch.ones(x.shape[0], 1)), **layout)
    with pytest.raises(InvalidArgument, match="rank_prefix_matrix"):
        first[4][1]
    buffer.destroy()
    return "ok"


def autograd_worker() -> str:
    """Gradients flow through the shim's HT ops (ncclep's HT autograd): the backward of dispatch is a
    combine, that of combine a dispatch along the handle."""
    _, world = rank_and_world()
    buffer = make_buffer()
    x, idx, _ = inputs(4)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, EXPERTS[world])
    leaf = x.clone().requires_grad_(True)
    recv_x, _, _, _, handle, _ = buffer.dispatch(
        leaf,
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=idx,
    )
    rows = (recv_x.float() * 3).to(torch.bfloat16)
    y, _, _ = buffer.combine(rows, handle)
    y.float().sum().backward()
    assert leaf.grad is not None
    times = in_rank.sum(dim=1, keepdim=True).to(torch.bfloat16)
    assert torch.equal(leaf.grad, (3 * times).expand_as(x).to(torch.bfloat16)), leaf.grad
    buffer.destroy()
    return "ok"


@pytest.mark.parametrize("world_name", ["world2", "world4"])
def test_ht_layout_dispatch_cached_and_combine(world_name: str, request: pytest.FixtureRequest) -> None:
    checks = request.getfixturevalue(world_name).run(dispatch_worker)
    assert checks[0] == 12


@pytest.mark.parametrize("world_name", ["world2", "world4"])
def test_ht_bias_growth_and_refusals(world_name: str, request: pytest.FixtureRequest) -> None:
    assert request.getfixturevalue(world_name).run(combine_extras_worker)[0] == "ok"


def test_ht_autograd_through_the_shim(world2: Any) -> None:
    assert world2.run(autograd_worker) == ["ok", "ok"]
