"""Bad input: a clear exception naming the argument and the limit, and the group stays usable.

Wrong device is not testable on a CPU-only machine (every tensor is on the group's device), so
there is no case for it here; tests/gpu covers it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from dist_pool import DistPool
from helpers import generator, random_x, rank_and_world, routing

import ncclep
from ncclep import fp8

E, T, H, KMAX = 16, 8, 384, 8  # both groups
B, K = 6, 4  # the good inputs
IA = ncclep.InvalidArgument


def good_inputs(salt: int, num_experts: int = E) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = generator(salt)
    x = random_x(B, 256, g)
    idx, w = routing("random", B, num_experts, K, g, masked=2)
    return x, idx, w


def good_ll_call(group: ncclep.Group, salt: int) -> None:
    x, idx, w = good_inputs(salt, group.num_experts)
    out = group.ll_dispatch(x, idx, w)
    y = group.ll_combine(out.x, out.handle)
    assert y.shape == x.shape and bool(torch.isfinite(y.float()).all())


def good_ht_call(group: ncclep.Group, salt: int) -> None:
    x, idx, w = good_inputs(salt, group.num_experts)
    out = group.ht_dispatch(x, idx, w, layout="expert_major", alignment=4)
    y, back = group.ht_combine(out.x, out.handle, topk_weights=out.topk_weights)
    assert y.shape == x.shape and back is not None


def expect(exc: type[BaseException], pattern: str, fn: Callable[[], Any]) -> BaseException:
    with pytest.raises(exc, match=pattern) as info:
        fn()
    return info.value


def ll_cases(group: ncclep.Group, ht_group: ncclep.Group) -> list[tuple[str, type[BaseException], str, Any]]:
    x, idx, w = good_inputs(0)
    out = group.ll_dispatch(x, idx, w)
    eo, handle = out.x, out.handle
    L, rows = group.num_local_experts, group.config.ll_rows_per_expert
    d = group.ll_dispatch
    c = group.ll_combine
    twice = idx.clone()
    twice[2, 1] = twice[2, 0] = 3
    # handles that are not this group's: another group's of the same sizes, one of other sizes
    # (rebuilt from its tensors, so only its sizes can tell), the other mode's
    twin = ncclep.Group(E, T, H, mode="ll", max_topk=KMAX, backend="reference")
    small = ncclep.Group(E, T // 2, H, mode="ll", max_topk=KMAX, backend="reference")
    twin_handle = twin.ll_dispatch(x, idx, w).handle
    small_handle = ncclep.LLHandle(*small.ll_dispatch(x[:4], idx[:4], w[:4]).handle.tensors())
    ht_handle = ht_group.ht_dispatch(x, idx, w).handle
    world = group.world_size
    return [
        ("x dtype", IA, r"x must have dtype bfloat16, got torch.float32",
         lambda: d(x.float(), idx, w)),
        ("x fp8 for LL", IA, r"x must have dtype bfloat16",
         lambda: d(x.to(fp8.FP8_DTYPE), idx, w)),
        ("topk_idx dtype", IA, r"topk_idx must have dtype int64 or int32, got torch.float32",
         lambda: d(x, idx.float(), w)),
        ("topk_idx int16", IA, r"topk_idx must have dtype int64 or int32",
         lambda: d(x, idx.to(torch.int16), w)),
        ("topk_weights dtype", IA, r"topk_weights must have dtype float32",
         lambda: d(x, idx, w.bfloat16())),
        ("topk_weights missing", IA, r"topk_weights must be a torch.Tensor",
         lambda: d(x, idx, None)),
        ("x ndim", IA, r"x must be 2-D, got shape \(1, 6, 256\)",
         lambda: d(x.unsqueeze(0), idx, w)),
        ("topk_idx ndim", IA, r"topk_idx must be 2-D", lambda: d(x, idx.reshape(-1), w)),
        ("x non-contiguous", IA, r"x must be contiguous",
         lambda: d(x.t().contiguous().t(), idx, w)),
        ("topk_idx non-contiguous", IA, r"topk_idx must be contiguous",
         lambda: d(x, idx.t().contiguous().t(), w)),
        ("too many tokens", ncclep.InvalidArgument,
         r"x has 9 tokens, more than the group's max_tokens_per_rank \(8\)",
         lambda: d(random_x(9, 256, generator(1)), routing("random", 9, E, K, generator(1))[0],
                   torch.rand(9, K))),
        ("hidden too large", IA, r"x has hidden size 512, more than the group's hidden \(384\)",
         lambda: d(random_x(B, 512, generator(2)), idx, w)),
        ("hidden not /128", IA, r"LL dispatch needs hidden divisible by 128, got 200",
         lambda: d(random_x(B, 200, generator(3)), idx, w)),
        ("top-k too large", IA, r"top-k is 9; it must be between 1 and max_topk \(8\)",
         lambda: d(x, torch.arange(9).repeat(B, 1), torch.rand(B, 9))),
        ("top-k zero", IA, r"top-k is 0; it must be between 1 and max_topk \(8\)",
         lambda: d(x, idx[:, :0], w[:, :0])),
        ("topk_weights shape", IA, r"topk_weights must have shape \(6, 4\), got \(6, 3\)",
         lambda: d(x, idx, w[:, :3].contiguous())),
        ("topk_idx rows", IA, r"topk_idx has 5 rows but x has 6 tokens",
         lambda: d(x, idx[:5], w[:5])),
        ("expert id too large", ncclep.InvalidArgument,
         r"topk_idx holds expert id 16; ids must be -1 \(none\) or in \[0, 16\)",
         lambda: d(x, torch.where(idx == idx[1, 1], 16, idx), w)),
        ("expert id below -1", IA, r"topk_idx holds expert id -2; ids must be -1",
         lambda: d(x, torch.where(idx == idx[0, 0], -2, idx), w)),
        ("expert twice", IA, r"topk_idx row 2 names the same expert twice",
         lambda: d(x, twice, w)),
        ("expert twice, send_only", IA, r"topk_idx row 2 names the same expert twice",
         lambda: d(x, twice, w, send_only=True)),
        ("ue8m0 without fp8", IA, r"ue8m0 scales need use_fp8=True",
         lambda: d(x, idx, w, ue8m0=True)),
        ("round_scale without fp8", IA, r"round_scale .* needs use_fp8=True and not ue8m0",
         lambda: d(x, idx, w, round_scale=True)),
        ("round_scale with ue8m0", IA, r"round_scale .* needs use_fp8=True and not ue8m0",
         lambda: d(x, idx, w, use_fp8=True, ue8m0=True, round_scale=True)),
        ("round_scale not a bool", IA, r"round_scale must be a bool, got 1",
         lambda: d(x, idx, w, use_fp8=True, round_scale=1)),
        ("expert_out dtype", IA, r"expert_out must have dtype bfloat16",
         lambda: c(eo.float(), handle)),
        ("expert_out shape", ncclep.InvalidArgument,
         rf"expert_out must have shape \({L}, {rows}, hidden\), got \({L}, {rows - 1}, 256\)",
         lambda: c(eo[:, 1:].contiguous(), handle)),
        ("expert_out hidden", IA, r"expert_out hidden must be a multiple of 128 up to 384",
         lambda: c(eo[:, :, :200].contiguous(), handle)),
        ("expert_out ndim", IA, r"expert_out must be 3-D", lambda: c(eo[0], handle)),
        ("expert_out non-contiguous", IA, r"expert_out must be contiguous",
         lambda: c(eo.transpose(0, 1).contiguous().transpose(0, 1), handle)),
        ("out shape", IA, r"out must have shape \(6, 256\), got \(6, 128\)",
         lambda: c(eo, handle, out=torch.empty(B, 128, dtype=torch.bfloat16))),
        ("out dtype", IA, r"out must have dtype bfloat16",
         lambda: c(eo, handle, out=torch.empty(B, 256))),
        ("handle None", IA, r"handle must be the LLHandle of this group's ll_dispatch, got NoneType",
         lambda: c(eo, None)),
        ("HT handle", IA, r"handle must be the LLHandle .*, got HTHandle", lambda: c(eo, ht_handle)),
        ("handle of another group", IA,
         rf"the LL handle comes from group {twin.id}, not from this group \({group.id}\)",
         lambda: c(eo, twin_handle)),
        ("handle of other sizes", IA,
         rf"LL handle's recv_rows has shape \({world}, {T // 2}, {KMAX}\); this group's handles have "
         rf"\({world}, {T}, {KMAX}\) \(is it a handle of another group\?\)",
         lambda: c(eo, small_handle)),
        ("handle field dtype", IA, r"LL handle's recv_weights must have dtype float32",
         lambda: c(eo, dataclasses.replace(handle, recv_weights=handle.recv_weights.double()))),
        ("use_fp8 not a bool", IA, r"use_fp8 must be a bool, got 'yes'", lambda: d(x, idx, w, use_fp8="yes")),
        ("send_only not a bool", IA, r"send_only must be a bool, got 1", lambda: c(eo, handle, send_only=1)),
        ("LL dispatch on an HT group", IA, r"LL ops need a group made with mode='ll'",
         lambda: ht_group.ll_dispatch(x, idx, w)),
        ("LL combine on an HT group", IA, r"LL ops need a group made with mode='ll'",
         lambda: ht_group.ll_combine(eo, handle)),
    ]  # fmt: skip


def ht_cases(group: ncclep.Group, ll_group: ncclep.Group) -> list[tuple[str, type[BaseException], str, Any]]:
    x, idx, w = good_inputs(10)
    q, s = fp8.quantize(x)
    out = group.ht_dispatch(x, idx, w, layout="expert_major", alignment=4)
    ll_out = ll_group.ll_dispatch(x, idx, w)
    routing_of_out = out.handle.tensors()[:3]  # what the cached dispatch takes
    n = out.x.shape[0]
    d = group.ht_dispatch
    c = group.ht_combine
    return [
        ("alignment with flat", IA, r"alignment applies to the expert_major layout only",
         lambda: d(x, idx, w, layout="flat", alignment=16)),
        ("alignment zero", IA, r"alignment must be a positive int, got 0",
         lambda: d(x, idx, w, layout="expert_major", alignment=0)),
        ("bad layout", IA, r"layout must be one of \('flat', 'expert_major'\), got 'rows'",
         lambda: d(x, idx, w, layout="rows")),
        ("fp8 without scales", IA, r"fp8 x needs x_scales \[B, H/128\]",
         lambda: d(q, idx, w)),
        ("scales with bf16", IA, r"x_scales is only for fp8 x",
         lambda: d(x, idx, w, x_scales=s)),
        ("scales shape", IA, r"x_scales must have shape \(6, 2\), got \(6, 1\)",
         lambda: d(q, idx, w, x_scales=s[:, :1].contiguous())),
        ("scales dtype", IA, r"x_scales must have dtype float32 or float8_e8m0fnu",
         lambda: d(q, idx, w, x_scales=s.bfloat16())),
        ("x dtype", IA, r"x must have dtype bfloat16 or float8_e4m3fn, got torch.float32",
         lambda: d(x.float(), idx, w)),
        ("hidden not /8", IA, r"x needs hidden divisible by 8, got 100",
         lambda: d(random_x(B, 100, generator(4)), idx, w)),
        ("fp8 hidden not /128", IA, r"fp8 x needs hidden divisible by 128, got 136",
         lambda: d(random_x(B, 136, generator(5)).to(fp8.FP8_DTYPE), idx, w, x_scales=s[:, :1])),
        ("hidden too large", IA, r"x has hidden size 392, more than the group's hidden \(384\)",
         lambda: d(random_x(B, 392, generator(6)), idx, w)),
        ("too many tokens", IA, r"max_tokens_per_rank \(8\)",
         lambda: d(random_x(9, 256, generator(7)), torch.arange(K).repeat(9, 1))),
        ("top-k too large", IA, r"top-k is 9; it must be between 1 and max_topk \(8\)",
         lambda: d(x, torch.arange(9).repeat(B, 1))),
        ("topk_weights shape", IA, r"topk_weights must have shape \(6, 4\)",
         lambda: d(x, idx, w.t().contiguous())),
        ("expert id too large", IA, r"expert id 99; ids must be -1 \(none\) or in \[0, 16\)",
         lambda: d(x, torch.where(idx == idx[3, 2], 99, idx), w)),
        ("expert id below -1", IA, r"expert id -5",
         lambda: d(x, torch.where(idx == idx[3, 2], -5, idx), w, layout="expert_major", send_only=True)),
        ("combine rows", IA, rf"x must have at most the dispatch's {n} rows, got {n + 1}",
         lambda: c(torch.cat([out.x, out.x[:1]]), out.handle)),
        ("combine dtype", IA, r"x must have dtype bfloat16",
         lambda: c(out.x.to(fp8.FP8_DTYPE), out.handle)),
        ("combine hidden", IA, r"x has hidden size 392, more than the group's hidden \(384\)",
         lambda: c(torch.zeros(n, 392, dtype=torch.bfloat16), out.handle)),
        ("combine weights shape", IA, rf"topk_weights must have shape \({n}, 4\)",
         lambda: c(out.x, out.handle, topk_weights=torch.rand(n, 3))),
        ("combine weights dtype", IA, r"topk_weights must have dtype float32",
         lambda: c(out.x, out.handle, topk_weights=torch.rand(n, K).double())),
        ("combine handle None", IA, r"handle must be the HTHandle of this group's ht_dispatch, got NoneType",
         lambda: c(out.x, None)),
        ("combine LL handle", IA, r"handle must be the HTHandle .*, got LLHandle",
         lambda: c(out.x, ll_out.handle)),
        ("combine handle recv_counts", IA, r"HT handle's recv_counts has shape \(3,\)",
         lambda: c(out.x, dataclasses.replace(out.handle, recv_counts=torch.zeros(3, dtype=torch.int32)))),
        ("combine handle id dtype", IA, r"HT handle's recv_topk_idx must have dtype int64 or int32",
         lambda: c(out.x, dataclasses.replace(out.handle, recv_topk_idx=out.topk_idx.float()))),
        ("combine hidden not /8", IA, r"HT combine needs hidden divisible by 8, got 100",
         lambda: c(torch.zeros(n, 100, dtype=torch.bfloat16), out.handle)),
        ("alignment a bool", IA, r"alignment must be a positive int, got True",
         lambda: d(x, idx, w, layout="expert_major", alignment=True)),
        ("cached dispatch rows", IA, r"x has 5 rows but the handle's dispatch had 6 tokens",
         lambda: torch.ops.ncclep.ht_dispatch_cached(group.id, x[:5].contiguous(), *routing_of_out)),
        ("cached dispatch rows, Group", IA, r"x has 5 rows but the handle's dispatch had 6 tokens",
         lambda: group.ht_dispatch_cached(x[:5], out.handle)),
        ("HT dispatch on an LL group", IA, r"HT ops need a group made with mode='ht'",
         lambda: ll_group.ht_dispatch(x, idx, w)),
        ("HT combine on an LL group", IA, r"HT ops need a group made with mode='ht'",
         lambda: ll_group.ht_combine(out.x, out.handle)),
    ]  # fmt: skip


def _bad_input_worker() -> list[str]:
    """Runs every case on every rank; returns the failures (empty when all behaved)."""
    failures: list[str] = []
    with (
        ncclep.Group(E, T, H, mode="ll", max_topk=KMAX, backend="reference") as ll_group,
        ncclep.Group(E, T, H, mode="ht", max_topk=KMAX, backend="reference") as ht_group,
    ):
        for salt, (name, exc, pattern, fn) in enumerate(ll_cases(ll_group, ht_group)):
            try:
                expect(exc, pattern, fn)
                good_ll_call(ll_group, salt)
            except BaseException as e:  # pytest.raises' failure is not an Exception
                failures.append(f"LL {name}: {type(e).__name__}: {e}")
        for salt, (name, exc, pattern, fn) in enumerate(ht_cases(ht_group, ll_group)):
            try:
                expect(exc, pattern, fn)
                good_ht_call(ht_group, salt)
            except BaseException as e:
                failures.append(f"HT {name}: {type(e).__name__}: {e}")
    return failures


def test_bad_input_raises_and_group_stays_usable(world2: DistPool) -> None:
    results = world2.run(_bad_input_worker)
    assert results == [[], []], "\n".join(line for r in results for line in r)


def _closed_group_worker() -> list[str]:
    x, idx, w = good_inputs(20)
    ll = ncclep.Group(E, T, H, mode="ll", max_topk=KMAX, backend="reference")
    ht = ncclep.Group(E, T, H, mode="ht", max_topk=KMAX, backend="reference")
    out_ll = ll.ll_dispatch(x, idx, w)
    out_ht = ht.ht_dispatch(x, idx, w)
    ll.close()
    ht.close()
    ll.close()  # closing twice is harmless
    assert ll.closed and ht.closed
    closed = rf"group {ll.id} is closed"
    expect(ncclep.NcclepError, closed, lambda: ll.ll_dispatch(x, idx, w))
    expect(ncclep.NcclepError, closed, lambda: ll.ll_combine(out_ll.x, out_ll.handle))
    expect(ncclep.NcclepError, closed, lambda: ll.ll_dispatch(x, idx, w, send_only=True))
    expect(ncclep.NcclepError, rf"group {ht.id} is closed", lambda: ht.ht_dispatch(x, idx, w))
    expect(ncclep.NcclepError, rf"group {ht.id} is closed", lambda: ht.ht_combine(out_ht.x, out_ht.handle))
    # the ops find groups by id: a closed id is refused there too
    expect(ncclep.NcclepError, rf"no open ncclep group has id {ll.id}",
           lambda: torch.ops.ncclep.ll_dispatch(ll.id, x, idx, w, False, False))  # fmt: skip
    expect(ncclep.NcclepError, rf"no open ncclep group has id {ll.id}", lambda: ncclep.get_group(ll.id))
    # other groups are unaffected
    with ncclep.Group(E, T, H, mode="ll", max_topk=KMAX, backend="reference") as fresh:
        good_ll_call(fresh, 21)
    return []


def test_closed_group_raises(world2: DistPool) -> None:
    assert world2.run(_closed_group_worker) == [[], []]


def _one_bad_rank_worker(bad_rank: int) -> list[str]:
    """Only ``bad_rank`` passes a bad expert id: it raises InvalidArgument, its peers CommError."""
    rank, world = rank_and_world()
    experts = 8 * world
    seen: list[str] = []
    with (
        ncclep.Group(experts, T, H, mode="ll", max_topk=KMAX, backend="reference") as ll,
        ncclep.Group(experts, T, H, mode="ht", max_topk=KMAX, backend="reference") as ht,
    ):
        for salt, (label, bad_value) in enumerate(
            [("out of range", "num_experts"), ("below -1", -3), ("repeated", None)]
        ):
            x, idx, w = good_inputs(30 + salt, experts)
            bad = idx.clone()
            if bad_value is None:
                bad[1, 1] = bad[1, 0] = 5
            else:
                bad[1, 2] = experts if bad_value == "num_experts" else bad_value
            calls: list[tuple[str, Callable[[torch.Tensor], Any]]] = [
                ("ll_dispatch", lambda i, x=x, w=w: ll.ll_dispatch(x, i, w)),
                ("ll_dispatch", lambda i, x=x, w=w: ll.ll_dispatch(x, i, w, use_fp8=True, send_only=True)),
                ("ht_dispatch", lambda i, x=x, w=w: ht.ht_dispatch(x, i, w)),
                ("ht_dispatch", lambda i, x=x: ht.ht_dispatch(x, i, layout="expert_major", send_only=True)),
            ]
            mine = bad if rank == bad_rank else idx
            for phase, call in calls:
                if rank == bad_rank:
                    expect(ncclep.InvalidArgument, "topk_idx", lambda call=call, i=mine: call(i))
                else:
                    err = expect(ncclep.CommError, rf"rank {bad_rank}", lambda call=call, i=mine: call(i))
                    assert isinstance(err, ncclep.CommError)
                    assert err.peer == bad_rank, f"{label}: CommError.peer is {err.peer}, not {bad_rank}"
                    assert err.rank == rank and re.search(phase, err.phase), (label, err.rank, err.phase)
                seen.append(f"{label}/{phase}")
                # the group is still usable, on every rank
                good_ll_call(ll, 40 + salt)
                good_ht_call(ht, 50 + salt)
    return seen


@pytest.mark.parametrize("world_name", ["world2", "world3"])
def test_bad_expert_id_on_one_rank_does_not_hang(world_name: str, request: pytest.FixtureRequest) -> None:
    pool = request.getfixturevalue(world_name)
    bad_rank = pool.world_size - 1
    results = pool.run(_one_bad_rank_worker, bad_rank)
    assert len(set(map(tuple, results))) == 1 and len(results[0]) == 12
