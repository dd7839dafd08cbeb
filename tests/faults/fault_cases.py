"""Worker side of the fault-injection suite: each case runs on every rank of a DistPool and
returns what happened there (what each call raised, after how long, whether the values that came
back were right, and which groups work afterwards), for test_faults.py to judge.

Every case runs on a process group of its own (``fresh_pg``), so a case that leaves a collective
behind (a timeout) cannot disturb the next one; nothing here uses the world group's collectives.
Every wait is bounded by the groups' ``timeout_s`` (TIMEOUT_S).

Inputs are drawn from a generator seeded by (rank, salt) alone, so each rank can rebuild every
rank's inputs: the oracles below use no collective and no code of ncclep's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

import ncclep

TIMEOUT_S = 4.0  # the groups' deadline
T, H, K = 16, 256, 4  # max tokens per rank, hidden, top-k
TOKENS = 12  # tokens of a good call
PG_TIMEOUT = timedelta(seconds=30)  # the case's process group: longer than TIMEOUT_S

_kept: list[Any] = []  # process groups of earlier cases (destroying one with a collective left
# behind would wait for gloo's own timeout)


def world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def experts() -> int:
    return 4 * dist.get_world_size()


def device_of(backend: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend == "cuda" else torch.device("cpu")


_cases = 0  # cases this worker ran: the same count on every rank of a world


def fresh_pg(backend: str, ranks: list[int] | None = None) -> Any:
    """A new process group for this case (every rank of the world must call this alike)."""
    global _cases
    _cases += 1
    ranks = list(range(dist.get_world_size())) if ranks is None else ranks
    pg = dist.new_group(ranks, timeout=PG_TIMEOUT, backend="nccl" if backend == "cuda" else "gloo")
    _kept.append(pg)
    return pg


def make_group(backend: str, mode: str, pg: Any, timeout_s: float = TIMEOUT_S, **kw: Any) -> ncclep.Group:
    args: dict[str, Any] = dict(mode=mode, process_group=pg, max_topk=K, timeout_s=timeout_s, backend=backend)
    args.update(kw)
    num_experts = args.pop("num_experts", 4 * dist.get_world_size(pg))
    return ncclep.Group(num_experts, args.pop("max_tokens", T), args.pop("hidden", H), **args)


# ------------------------------------------------------------------------------------ inputs


def inputs(
    rank: int, salt: int, num_experts: int, device: torch.device, tokens: int = TOKENS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s good input of call ``salt``: (x bf16 [B, H], topk_idx [B, K], weights)."""
    g = torch.Generator().manual_seed(1_000_003 * rank + 7919 * salt + 17)
    scale = torch.rand(tokens, 1, generator=g) * 2 + 0.5
    x = (torch.randn(tokens, H, generator=g) * scale).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(num_experts, generator=g)[:K] for _ in range(tokens)])
    idx[::5, -1] = -1  # some empty choices
    w = torch.rand(tokens, K, generator=g) + 0.1
    return x.to(device), idx.to(device), w.to(device)


def factor(expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The synthetic experts: expert e multiplies its rows by (e + 1) / E."""
    return (expert.float() + 1) / num_experts


def combine_oracle(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, num_experts: int) -> torch.Tensor:
    """fp32 Σ_k w[b,k] · factor(e_k) · x[b] over the valid choices: what a round trip returns."""
    coef = torch.where(idx >= 0, w * factor(idx.clamp_min(0), num_experts), 0.0).sum(1, keepdim=True)
    return x.float().cpu() * coef.cpu()


def expected_counts(salt: int, num_experts: int, rank: int, world_size: int) -> list[int]:
    """Rows of each of ``rank``'s local experts in call ``salt``: every rank's routing, rebuilt."""
    local = num_experts // world_size
    counts = [0] * local
    for r in range(world_size):
        _, idx, _ = inputs(r, salt, num_experts, torch.device("cpu"))
        for e in idx.flatten().tolist():
            if e >= 0 and e // local == rank:
                counts[e - rank * local] += 1
    return counts


def close_enough(out: torch.Tensor, ref: torch.Tensor, what: str) -> str | None:
    out32 = out.float().cpu()
    if not bool(torch.isfinite(out32).all()):
        return f"{what}: non-finite values"
    bound = ref.abs() * 2.0**-6 + 1e-6
    err = (out32 - ref).abs()
    if not bool((err <= bound).all()):
        return f"{what}: off by {float((err - bound).max()):.3g} beyond the bf16 bound"
    return None


# ------------------------------------------------------------------------------ good calls


def ll_round_trip(group: ncclep.Group, salt: int, *, dispatch_only: bool = False) -> str:
    """One good LL dispatch + combine; "correct" or what was wrong."""
    rank, num_experts, dev = group.rank, group.num_experts, group.device
    x, idx, w = inputs(rank, salt, num_experts, dev)
    out = group.ll_dispatch(x, idx, w)
    group.check()
    want = expected_counts(salt, num_experts, rank, group.world_size)
    if out.expert_counts.tolist() != want:
        return f"wrong: ll expert_counts {out.expert_counts.tolist()} != {want}"
    if dispatch_only:
        return "correct"
    return ll_combine_checked(group, out, salt)


def ll_expert_out(group: ncclep.Group, out: ncclep.LLDispatchOutput) -> torch.Tensor:
    local = group.num_local_experts
    first = group.rank * local
    f = factor(torch.arange(first, first + local, device=out.x.device), group.num_experts)
    return (out.x.float() * f.view(local, 1, 1)).to(torch.bfloat16)


def ll_combine_checked(group: ncclep.Group, out: ncclep.LLDispatchOutput, salt: int) -> str:
    x, idx, w = inputs(group.rank, salt, group.num_experts, group.device)
    y = group.ll_combine(ll_expert_out(group, out), out.handle)
    group.check()
    problem = close_enough(y, combine_oracle(x, idx, w, group.num_experts), "ll_combine")
    return f"wrong: {problem}" if problem else "correct"


def ht_expert_rows(group: ncclep.Group, out: ncclep.HTDispatchOutput) -> torch.Tensor:
    """Flat layout: each row times Σ over its local choices of weight · factor (0 on padding)."""
    first = group.rank * group.num_local_experts
    local = out.topk_idx
    assert out.topk_weights is not None
    f = factor(local.clamp_min(0) + first, group.num_experts)
    coef = torch.where(local >= 0, out.topk_weights * f, 0.0).sum(1, keepdim=True)
    return (out.x.float() * coef).to(torch.bfloat16)


def ht_round_trip(group: ncclep.Group, salt: int) -> str:
    """One good HT dispatch (flat) + combine; "correct" or what was wrong."""
    rank, num_experts, dev = group.rank, group.num_experts, group.device
    x, idx, w = inputs(rank, salt, num_experts, dev)
    out = group.ht_dispatch(x, idx, w)
    group.check()
    want = expected_counts(salt, num_experts, rank, group.world_size)
    if out.expert_counts.tolist() != want:
        return f"wrong: ht expert_counts {out.expert_counts.tolist()} != {want}"
    return ht_combine_checked(group, out, salt)


def ht_combine_checked(group: ncclep.Group, out: ncclep.HTDispatchOutput, salt: int) -> str:
    x, idx, w = inputs(group.rank, salt, group.num_experts, group.device)
    y, _ = group.ht_combine(ht_expert_rows(group, out), out.handle)
    group.check()
    problem = close_enough(y, combine_oracle(x, idx, w, group.num_experts), "ht_combine")
    return f"wrong: {problem}" if problem else "correct"


def round_trip(group: ncclep.Group, salt: int) -> str:
    return ll_round_trip(group, salt) if group.mode == "ll" else ht_round_trip(group, salt)


# ------------------------------------------------------------------------------ recording


def attempt(fn: Callable[[], Any]) -> dict[str, Any]:
    """What ``fn()`` did: returned (its value if a str, else "returned") or raised what, and when."""
    t0 = time.monotonic()
    try:
        value = fn()
        return dict(outcome=value if isinstance(value, str) else "returned", s=time.monotonic() - t0)
    except ncclep.CommError as e:
        return dict(
            outcome="CommError",
            reason=e.reason,
            peer=e.peer,
            rank=e.rank,
            phase=e.phase,
            usable=e.group_usable,
            msg=str(e),
            s=time.monotonic() - t0,
        )
    except ncclep.InvalidArgument as e:
        return dict(outcome="InvalidArgument", reason=e.reason, msg=str(e), s=time.monotonic() - t0)
    except Exception as e:
        return dict(outcome=type(e).__name__, msg=str(e)[:500], s=time.monotonic() - t0)


def settled(group: ncclep.Group, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` then ``group.check()``: the CUDA kernels report a failed wait through the group's
    error word, which check() raises (after synchronising) in the same attempt, so that its time
    is measured like the reference backend's, which raises inside ``fn`` (check() does nothing)."""

    def run() -> Any:
        value = fn()
        group.check()
        return value

    return run


def later_report(backend: str, holds: bool, next_call: Callable[[], Any]) -> dict[str, Any] | None:
    """CUDA backend: the report a kernel left for this rank (``holds``) about the call just made,
    raised by the rank's next call once those kernels finished (synchronised first, so that it is
    this call that raises, before taking part in any exchange). None on ranks holding none."""
    if backend != "cuda":
        return None
    torch.cuda.synchronize()
    return attempt(next_call) if holds else None


def after_fault(groups: dict[str, ncclep.Group], salt: int) -> dict[str, dict[str, Any]]:
    """The next good call on each group (in name order): does it work and return right values?"""
    return {name: attempt(lambda g=g: round_trip(g, salt)) for name, g in sorted(groups.items())}


# ------------------------------------------------------------------------------ bad input


def _bad(
    kind: str, group: ncclep.Group, other: ncclep.Group, salt: int, dev: torch.device
) -> Callable[[], Any]:
    """The bad call of ``kind`` on ``group`` (``other``: a second group of the same mode)."""
    E = group.num_experts
    x, idx, w = inputs(group.rank, salt, E, dev)
    if kind == "ll_dispatch/tokens":  # one more token than the group's max_tokens_per_rank
        xb, ib, wb = inputs(group.rank, salt, E, dev, tokens=T + 1)
        return lambda: group.ll_dispatch(xb, ib, wb)
    if kind == "ll_dispatch/dtype":
        return lambda: group.ll_dispatch(x.float(), idx, w)
    if kind == "ll_dispatch/hidden":  # wider than the group's hidden
        return lambda: group.ll_dispatch(torch.cat([x, x], dim=1), idx, w)
    if kind == "ll_dispatch/expert_id":
        bad = idx.clone()
        bad[3, 0] = E
        return lambda: group.ll_dispatch(x, bad, w)
    if kind == "ll_dispatch/send_only_duplicate":
        bad = idx.clone()
        bad[2, 1] = bad[2, 0]
        return lambda: group.ll_dispatch(x, bad, w, use_fp8=True, send_only=True).wait()
    if kind == "ht_dispatch/tokens":
        xb, ib, wb = inputs(group.rank, salt, E, dev, tokens=T + 1)
        return lambda: group.ht_dispatch(xb, ib, wb)
    if kind == "ht_dispatch/shape":
        return lambda: group.ht_dispatch(x, idx, w[:, :2].contiguous())
    if kind == "ht_dispatch/expert_id":
        bad = idx.clone()
        bad[1, 1] = -7
        return lambda: group.ht_dispatch(x, bad, w, layout="expert_major", alignment=4, send_only=True).wait()
    raise KeyError(kind)


COMBINE_KINDS = (
    "ll_combine/dtype",
    "ll_combine/handle_none",
    "ll_combine/handle_of_other_group",
    "ll_combine/out_shape",
    "ht_combine/rows",
    "ht_combine/handle_of_ll",
    "ht_dispatch_cached/rows",
)
DISPATCH_KINDS = (
    "ll_dispatch/tokens",
    "ll_dispatch/dtype",
    "ll_dispatch/hidden",
    "ll_dispatch/expert_id",
    "ll_dispatch/send_only_duplicate",
    "ht_dispatch/tokens",
    "ht_dispatch/shape",
    "ht_dispatch/expert_id",
)
# On the CUDA backend the kernels check expert ids (no host sync): the call goes through with the
# bad ids as -1, and the bad rank's next call raises.
FOUND_ON_DEVICE = ("ll_dispatch/expert_id", "ll_dispatch/send_only_duplicate", "ht_dispatch/expert_id")
REASONS = {
    "ll_dispatch/tokens": "tokens",
    "ll_dispatch/dtype": "dtype",
    "ll_dispatch/hidden": "hidden",
    "ll_dispatch/expert_id": "expert_id",
    "ll_dispatch/send_only_duplicate": "duplicate_expert",
    "ht_dispatch/tokens": "tokens",
    "ht_dispatch/shape": "shape",
    "ht_dispatch/expert_id": "expert_id",
    "ll_combine/dtype": "dtype",
    "ll_combine/handle_none": "handle",
    "ll_combine/handle_of_other_group": "handle",
    "ll_combine/out_shape": "shape",
    "ht_combine/rows": "shape",
    "ht_combine/handle_of_ll": "handle",
    "ht_dispatch_cached/rows": "shape",
}


def bad_input_case(kind: str, bad_rank: int, backend: str) -> dict[str, Any]:
    """Rank ``bad_rank`` makes the bad call ``kind``, the others the good call of the same op;
    then every rank makes the next good call on each group (for combines: the same combine
    again, with the same handle, which must give the right values). On the CUDA backend, the
    ranks that hold a report of the fault (``later``: the peers, or the bad rank when the kernels
    found the bad ids) first make that next call once more: it raises, taking no part."""
    rank, _ = world()
    dev = device_of(backend)
    pg = fresh_pg(backend)
    mode = kind[:2]
    group = make_group(backend, mode, pg)
    other = make_group(backend, mode, pg)
    ll = group if mode == "ll" else make_group(backend, "ll", pg)
    salt = 3
    groups = {"group": group, "other": other}
    # a good call first: the first call in a process pays one-off costs (lazy imports of the
    # custom-op machinery) that would blur how long the fault took
    result: dict[str, Any] = {"warmup": attempt(lambda: round_trip(group, 2))}
    holds = (rank == bad_rank) == (kind in FOUND_ON_DEVICE)
    if kind in DISPATCH_KINDS:
        if rank == bad_rank:
            result["fault"] = attempt(_bad(kind, group, other, salt, dev))
        else:
            x, idx, w = inputs(rank, salt, group.num_experts, dev)
            call = group.ll_dispatch if mode == "ll" else group.ht_dispatch
            result["fault"] = attempt(lambda: call(x, idx, w))
        result["later"] = later_report(backend, holds, lambda: round_trip(group, salt + 1))
        result["after"] = after_fault(groups, salt + 1)
        return result
    # combines: a good dispatch first, on every rank
    E = group.num_experts
    x, idx, w = inputs(rank, salt, E, dev)
    if mode == "ll":
        out = group.ll_dispatch(x, idx, w)
        good_eo = ll_expert_out(group, out)
        if kind == "ll_combine/handle_of_other_group":
            other_out = other.ll_dispatch(x, idx, w)
        bad_calls = {
            "ll_combine/dtype": lambda: group.ll_combine(good_eo.float(), out.handle),
            "ll_combine/handle_none": lambda: group.ll_combine(good_eo, None),  # type: ignore[arg-type]
            "ll_combine/handle_of_other_group": lambda: group.ll_combine(good_eo, other_out.handle),
            "ll_combine/out_shape": lambda: group.ll_combine(
                good_eo, out.handle, out=torch.empty(TOKENS, H // 2, dtype=torch.bfloat16, device=dev)
            ),
        }
        good_call = lambda: ll_combine_checked(group, out, salt)  # noqa: E731
        plain_call = lambda: group.ll_combine(good_eo, out.handle)  # noqa: E731
        if kind == "ll_combine/handle_of_other_group":  # pair the other group's dispatch too
            groups = {"group": group}
    else:
        out = group.ht_dispatch(x, idx, w)
        rows = ht_expert_rows(group, out)
        if kind == "ht_combine/handle_of_ll":
            ll_out = ll.ll_dispatch(x, idx, w)
            groups = {"group": group, "ll": ll}
        h = out.handle
        bad_calls = {
            "ht_combine/rows": lambda: group.ht_combine(torch.cat([rows, rows[:1]]), h),  # one row too many
            "ht_combine/handle_of_ll": lambda: group.ht_combine(rows, ll_out.handle),  # type: ignore[arg-type]
            # the cached dispatch (the backward of a combine) with one row too few
            "ht_dispatch_cached/rows": lambda: torch.ops.ncclep.ht_dispatch_cached(
                group.id, x[:-1].contiguous(), h.send_pos, h.recv_slot, h.recv_counts
            ),
        }
        if kind == "ht_dispatch_cached/rows":
            good_call = lambda: cached_checked(group, out, x)  # noqa: E731
            plain_call = lambda: torch.ops.ncclep.ht_dispatch_cached(  # noqa: E731
                group.id, x, h.send_pos, h.recv_slot, h.recv_counts
            )
            # Eager Group calls skip torch.ops, so this is the process's first custom-op call: its
            # one-time set-up (seconds) would otherwise delay the bad rank and be timed as the fault.
            plain_call()
        else:
            good_call = lambda: ht_combine_checked(group, out, salt)  # noqa: E731
            plain_call = lambda: group.ht_combine(rows, h)  # noqa: E731
    # the peers' call is not followed by a check: on the CUDA backend it returns (outputs to
    # discard) and the rejection is raised by the next call (``later``)
    result["fault"] = attempt(bad_calls[kind] if rank == bad_rank else plain_call)
    result["later"] = later_report(backend, holds, good_call)
    result["retry"] = attempt(good_call)  # the same op again, good everywhere
    if kind == "ll_combine/handle_of_other_group":
        result["other_combine"] = attempt(lambda: ll_combine_checked(other, other_out, salt))
    result["after"] = after_fault(groups, salt + 1)
    return result


def cached_checked(group: ncclep.Group, out: ncclep.HTDispatchOutput, x: torch.Tensor) -> str:
    """ht_dispatch_cached(x) must put each source token's x on every row that holds it."""
    h = out.handle
    got = torch.ops.ncclep.ht_dispatch_cached(group.id, x, h.send_pos, h.recv_slot, h.recv_counts)
    group.check()
    held = h.recv_slot >= 0
    if not torch.equal(got[held].view(torch.int16), out.x[held].view(torch.int16)):
        return "wrong: ht_dispatch_cached rows differ from the dispatch's"
    return "correct"


# ------------------------------------------------------------------------------ bad group arguments


def bad_group_args_case(kind: str, bad_rank: int, backend: str) -> dict[str, Any]:
    """Rank ``bad_rank`` passes bad (``invalid``) or different (``different``) Group arguments."""
    rank, _ = world()
    pg = fresh_pg(backend)
    kw: dict[str, Any] = {}
    if rank == bad_rank:
        kw = dict(hidden=300) if kind == "invalid" else dict(max_tokens=2 * T)
    result = {"fault": attempt(lambda: make_group(backend, "ll", pg, **kw) and "returned")}
    result["after"] = after_fault({"new": make_group(backend, "ll", pg)}, 5)
    return result


# ------------------------------------------------------------------------------ a rank skips a call


def skip_case(skipper: int, then: str, backend: str) -> dict[str, Any]:
    """Rank ``skipper`` skips one LL dispatch (after a good round trip on the group).

    ``then``: "stop": the skipper makes no more calls on the group; "continue": after the others
    gave up it makes its next call (the one it skipped) on the same group. Group ``spare``, on a
    process group of its own, must keep working everywhere; then every rank closes the broken
    group and opens a new one on a new process group.
    """
    rank, _ = world()
    dev = device_of(backend)
    pg = fresh_pg(backend)
    spare_pg = fresh_pg(backend)
    group = make_group(backend, "ll", pg)
    spare = make_group(backend, "ht", spare_pg, timeout_s=4 * TIMEOUT_S)
    result: dict[str, Any] = {"warmup": attempt(lambda: ll_round_trip(group, 1))}
    x, idx, w = inputs(rank, 2, group.num_experts, dev)
    store = dist.distributed_c10d._get_default_store()
    case = f"faults/skip/{_cases}"
    if rank == skipper:
        result["fault"] = dict(outcome="skipped", s=0.0)
        if then == "continue":
            # wait (bounded) until every other rank raised, then make the skipped call late
            for peer in range(dist.get_world_size()):
                if peer != skipper:
                    store.wait([f"{case}/{peer}"], timedelta(seconds=3 * TIMEOUT_S))
            result["late_call"] = attempt(settled(group, lambda: group.ll_dispatch(x, idx, w)))
    else:
        result["fault"] = attempt(settled(group, lambda: group.ll_dispatch(x, idx, w)))
        result["next_call"] = attempt(settled(group, lambda: group.ll_dispatch(x, idx, w)))  # broken: at once
        store.set(f"{case}/{rank}", "raised")
    result["spare"] = attempt(lambda: ht_round_trip(spare, 7))
    group.close()
    recovered = make_group(backend, "ll", fresh_pg(backend))
    result["after"] = after_fault({"new_group_on_new_pg": recovered}, 8)
    return result


# ------------------------------------------------------------------------------ a rank dies


def die_case(victim: int, how: str, backend: str) -> dict[str, Any]:
    """Rank ``victim``'s process exits in the middle of an LL dispatch (after the counts went
    out, before the rows): the others must raise CommError promptly (``how="send_only"``: from
    the Pending's wait(), and again from a second wait(), which must not hand out the rows).
    Group ``pair``, over two survivors only (3 ranks), must keep working."""
    rank, world_size = world()
    dev = device_of(backend)
    pg = fresh_pg(backend)
    survivors = [r for r in range(world_size) if r != victim][:2]
    pair_pg = fresh_pg(backend, survivors) if world_size > 2 else None
    group = make_group(backend, "ll", pg)
    pair = make_group(backend, "ht", pair_pg) if pair_pg is not None and rank in survivors else None
    result: dict[str, Any] = {"warmup": attempt(lambda: ll_round_trip(group, 1))}
    x, idx, w = inputs(rank, 2, group.num_experts, dev)
    if rank == victim:
        if backend == "cuda":  # no host step inside a CUDA call: die just before it
            os._exit(17)
        from ncclep.reference import exchange

        def die(*_: Any, **__: Any) -> None:
            os._exit(17)  # after the header went out, before the rows

        exchange.Exchange.rows = die  # type: ignore[method-assign]
    if how == "send_only":
        pending = group.ll_dispatch(x, idx, w, send_only=True)
        result["fault"] = attempt(settled(group, pending.wait))
        result["wait_again"] = attempt(settled(group, pending.wait))
    else:
        result["fault"] = attempt(settled(group, lambda: group.ll_dispatch(x, idx, w)))
    result["next_call"] = attempt(settled(group, lambda: group.ll_dispatch(x, idx, w)))
    if pair is not None:
        result["after"] = after_fault({"pair_of_survivors": pair}, 9)
    return result


# ------------------------------------------------------------------------------ mismatched calls


def mismatch_case(kind: str, odd_rank: int, backend: str) -> dict[str, Any]:
    """Rank ``odd_rank`` calls another op than its peers (same call number).

    ``combine_vs_dispatch``: it combines (its handle of an earlier dispatch) while the others
    dispatch, on one LL group. ``ll_vs_ht``: it calls the LL group's dispatch while the others
    call the HT group's, both groups on one process group. Afterwards: the groups involved are
    broken everywhere; a group on the same process group made afresh works, as does a
    third group made before the fault that took no part in it (``bystander``, HT on its own pg).
    """
    rank, _ = world()
    dev = device_of(backend)
    pg = fresh_pg(backend)
    by_pg = fresh_pg(backend)
    ll = make_group(backend, "ll", pg)
    ht = make_group(backend, "ht", pg)
    bystander = make_group(backend, "ht", by_pg)
    x, idx, w = inputs(rank, 2, ll.num_experts, dev)
    result: dict[str, Any] = {}
    if kind == "combine_vs_dispatch":
        first = ll.ll_dispatch(x, idx, w)  # every rank: a good dispatch, whose combine is due
        result["warmup"] = attempt(lambda: ll_combine_checked(ll, first, 2))
        out = ll.ll_dispatch(x, idx, w)
        if rank == odd_rank:
            result["fault"] = attempt(lambda: ll.ll_combine(ll_expert_out(ll, out), out.handle))
        else:
            result["fault"] = attempt(lambda: ll.ll_dispatch(x, idx, w))
        broken = {"ll": ll}
    else:
        if rank == odd_rank:
            result["fault"] = attempt(lambda: ll.ll_dispatch(x, idx, w))
        else:
            result["fault"] = attempt(lambda: ht.ht_dispatch(x, idx, w))
        broken = {"ll": ll, "ht": ht} if rank == odd_rank else {"ht": ht, "ll": ll}
    result["broken_after"] = {
        name: attempt(lambda g=g: round_trip(g, 4))
        for name, g in broken.items()
        if _used(name, kind, rank, odd_rank)
    }
    for g in (ll, ht):
        g.close()
    fresh = make_group(backend, "ll", pg)
    result["after"] = after_fault({"bystander": bystander, "new_group_same_pg": fresh}, 6)
    return result


def _used(name: str, kind: str, rank: int, odd_rank: int) -> bool:
    """Whether group ``name`` took part in this rank's faulty call (so must now be broken)."""
    if kind == "combine_vs_dispatch":
        return name == "ll"
    return name == ("ll" if rank == odd_rank else "ht")
