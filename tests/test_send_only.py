"""send_only: each op returns a Pending whose wait() gives what the blocking call gives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from dist_pool import DistPool
from helpers import assert_bits_equal, generator, random_x, rank_and_world, routing, step

import ncclep
from ncclep import fp8

TOKENS = 12
HIDDEN = 256


def same_ll_dispatch(a: ncclep.LLDispatchOutput, b: ncclep.LLDispatchOutput, what: str) -> None:
    """Equal where defined: rows below expert_counts, slots below recv_slot_counts, the whole send_slots."""
    assert_bits_equal(a.expert_counts, b.expert_counts, f"{what}: expert_counts")
    for e, n in enumerate(a.expert_counts.tolist()):
        assert_bits_equal(a.x[e, :n], b.x[e, :n], f"{what}: x of expert {e}")
        if a.scales is not None or b.scales is not None:
            assert a.scales is not None and b.scales is not None, what
            assert_bits_equal(a.scales[e, :n], b.scales[e, :n], f"{what}: scales of expert {e}")
    ha, hb = a.handle, b.handle
    assert_bits_equal(ha.send_slots, hb.send_slots, f"{what}: send_slots")
    assert_bits_equal(ha.recv_slot_counts, hb.recv_slot_counts, f"{what}: recv_slot_counts")
    for r, n in enumerate(ha.recv_slot_counts.tolist()):
        assert_bits_equal(ha.recv_rows[r, :n], hb.recv_rows[r, :n], f"{what}: recv_rows")
        assert_bits_equal(ha.recv_weights[r, :n], hb.recv_weights[r, :n], f"{what}: recv_weights")


def same_ht_dispatch(a: ncclep.HTDispatchOutput, b: ncclep.HTDispatchOutput, what: str) -> None:
    """Equal on the rows that hold a token, and equal metadata everywhere."""
    assert_bits_equal(a.num_recv, b.num_recv, f"{what}: num_recv")
    assert_bits_equal(a.expert_counts, b.expert_counts, f"{what}: expert_counts")
    assert_bits_equal(a.handle.recv_slot, b.handle.recv_slot, f"{what}: recv_slot")
    assert_bits_equal(a.handle.send_pos, b.handle.send_pos, f"{what}: send_pos")
    assert_bits_equal(a.handle.recv_counts, b.handle.recv_counts, f"{what}: recv_counts")
    assert_bits_equal(a.topk_idx, b.topk_idx, f"{what}: topk_idx")
    held = a.handle.recv_slot >= 0
    assert_bits_equal(a.x[held], b.x[held], f"{what}: x")
    for name in ("scales", "topk_weights"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert (ta is None) == (tb is None), f"{what}: {name}"
        if ta is not None:
            assert_bits_equal(ta[held], tb[held], f"{what}: {name}")


def check_pending(pending: object, blocking: object, compare: Callable[..., None], what: str) -> object:
    assert isinstance(pending, ncclep.Pending), f"{what}: send_only must return a Pending"
    first = pending.wait()
    assert pending.wait() is first, f"{what}: a second wait() must return the same object"
    assert pending() is first, f"{what}: calling the Pending is wait()"
    compare(first, blocking, what)
    return first


def _ll_worker(use_fp8: bool) -> int:
    rank, world = rank_and_world()
    num_experts = 8 * world
    checked = 0
    with ncclep.Group(num_experts, TOKENS, HIDDEN, mode="ll", max_topk=8, backend="reference") as group:
        for i, (kind, topk) in enumerate([("random", 8), ("skewed", 4), ("hot", 1)]):
            g = generator(i)
            tokens = 0 if (rank == 1 and i == 1) else TOKENS - i
            x = random_x(tokens, HIDDEN, g)
            idx, w = routing(kind, tokens, num_experts, topk, g, masked=3, hot_rank=world - 1)
            what = f"ll call {i}"
            blocking = step(group.ll_dispatch, x, idx, w, use_fp8=use_fp8)
            pending = step(group.ll_dispatch, x, idx, w, use_fp8=use_fp8, send_only=True)
            out = step(check_pending, pending, blocking, same_ll_dispatch, f"{what} dispatch")

            values = fp8.dequantize(out.x, out.scales) if use_fp8 else out.x.float()
            expert_out = (values * 0.5).to(torch.bfloat16)
            combined = step(group.ll_combine, expert_out, out.handle)
            pending_c = step(group.ll_combine, expert_out, out.handle, send_only=True)
            step(check_pending, pending_c, combined, assert_bits_equal, f"{what} combine")
            # send_only with out=: the result lands in the given tensor
            buf = torch.full_like(combined, float("nan"))
            pending_o = step(group.ll_combine, expert_out, out.handle, out=buf, send_only=True)
            got = step(check_pending, pending_o, combined, assert_bits_equal, f"{what} combine out=")
            assert got is buf, f"{what}: send_only combine with out= must give back out"

            # two dispatches in flight, finished in the opposite order
            g2 = generator(50 + i)
            x2 = random_x(tokens, HIDDEN, g2)
            idx2, w2 = routing("uniform", tokens, num_experts, topk, g2)
            blocking2 = step(group.ll_dispatch, x2, idx2, w2, use_fp8=use_fp8)
            first = step(group.ll_dispatch, x, idx, w, use_fp8=use_fp8, send_only=True)
            second = step(group.ll_dispatch, x2, idx2, w2, use_fp8=use_fp8, send_only=True)
            step(check_pending, second, blocking2, same_ll_dispatch, f"{what} second in flight")
            step(check_pending, first, blocking, same_ll_dispatch, f"{what} first in flight")
            checked += 1
    return checked


def _ht_worker(layout: str, use_fp8: bool) -> int:
    rank, world = rank_and_world()
    num_experts = 8 * world
    alignment = 4 if layout == "expert_major" else 1
    checked = 0
    with ncclep.Group(num_experts, TOKENS, HIDDEN, mode="ht", max_topk=8, backend="reference") as group:
        for i, (kind, topk) in enumerate([("random", 8), ("skewed", 4), ("hot", 1)]):
            g = generator(10 + i)
            tokens = 0 if (rank == 1 and i == 1) else TOKENS - i
            x = random_x(tokens, HIDDEN, g)
            scales = None
            if use_fp8:
                x, scales = fp8.quantize(x)
            idx, w = routing(kind, tokens, num_experts, topk, g, masked=3, hot_rank=world - 1)
            weights = w if i != 1 else None
            what = f"ht call {i}"
            args = dict(topk_weights=weights, x_scales=scales, layout=layout, alignment=alignment)
            blocking = step(group.ht_dispatch, x, idx, **args)
            pending = step(group.ht_dispatch, x, idx, **args, send_only=True)
            out = step(check_pending, pending, blocking, same_ht_dispatch, f"{what} dispatch")

            y = (out.x.float() if not use_fp8 else fp8.dequantize(out.x, out.scales)).to(torch.bfloat16)
            w_rows = torch.rand(out.topk_idx.shape, generator=g)
            for tw in (None, w_rows):
                combined = step(group.ht_combine, y, out.handle, topk_weights=tw)
                pending_c = step(group.ht_combine, y, out.handle, topk_weights=tw, send_only=True)
                step(
                    check_pending, pending_c, combined, same_pair, f"{what} combine weights={tw is not None}"
                )
            checked += 1
    return checked


def same_pair(a: tuple[Any, ...], b: tuple[Any, ...], what: str) -> None:
    assert_bits_equal(a[0], b[0], f"{what}: out")
    assert (a[1] is None) == (b[1] is None), f"{what}: weights"
    if a[1] is not None:
        assert_bits_equal(a[1], b[1], f"{what}: weights")


@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
def test_ll_send_only(world2: DistPool, use_fp8: bool) -> None:
    assert world2.run(_ll_worker, use_fp8) == [3, 3]


@pytest.mark.parametrize("use_fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("layout", ["flat", "expert_major"])
def test_ht_send_only(world2: DistPool, layout: str, use_fp8: bool) -> None:
    assert world2.run(_ht_worker, layout, use_fp8) == [3, 3]


def test_send_only_world3(world3: DistPool) -> None:
    assert world3.run(_ll_worker, False) == [3, 3, 3]
    assert world3.run(_ht_worker, "expert_major", False) == [3, 3, 3]
