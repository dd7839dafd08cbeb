"""LL dispatch and combine against the per-token oracles of ncclep.testing (world sizes 2, 3, 4)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import (
    assert_bits_equal,
    check_close,
    dequantized_row,
    expected_send_slots,
    expert_factor,
    generator,
    owner,
    random_x,
    rank_and_world,
    routing_for_call,
    step,
    tokens_to,
)

import ncclep
from ncclep import fp8, outputs, testing

HIDDEN = 1152
MAX_TOPK = 16
TOKENS = 20
PRECISIONS = {"bf16": (False, False), "fp8": (True, False), "fp8-ue8m0": (True, True)}


def num_experts_for(world: int) -> int:
    return {2: 32, 3: 24, 4: 32}[world]


def ll_calls(world: int) -> list[dict[str, Any]]:
    """Consecutive calls on one group: routing, top-k, hidden and token counts change every time."""
    local = num_experts_for(world) // world
    t = TOKENS
    some = [0 if r == 1 else t - 3 * r for r in range(world)]  # rank 1 sends nothing
    return [
        dict(routing="random", topk=8, hidden=HIDDEN, tokens=[t] * world, masked=7),
        dict(routing="skewed", topk=16, hidden=128, tokens=some),
        dict(routing="hot", topk=min(8, local), hidden=384, tokens=[t // 2 + r for r in range(world)],
             hot_rank=world - 1),
        dict(routing="uniform", topk=1, hidden=128, tokens=[t] * world, masked=3, int32=True),
        dict(routing="random", topk=16, hidden=384, tokens=[r + 1 for r in range(world)], masked=9),
        # the hot rank itself has no tokens
        dict(routing="hot", topk=1, hidden=HIDDEN, tokens=[0] + [t] * (world - 1), hot_rank=0),
        dict(routing="skewed", topk=8, hidden=HIDDEN, tokens=[t] * world, masked=4, masked_rows=3),
        # local expert 0 of every rank stays empty: its first row is padding (garbage in combine)
        dict(routing="no-expert0", topk=4, hidden=256, tokens=[t - r for r in range(world)], masked=5),
    ]  # fmt: skip


def routing_avoiding_first_local_expert(
    tokens: int, num_experts: int, topk: int, g: torch.Generator, masked: int
) -> tuple[torch.Tensor, torch.Tensor]:
    _, world = rank_and_world()
    local = num_experts // world
    allowed = torch.tensor([e for e in range(num_experts) if e % local])
    idx = allowed[torch.rand(tokens, allowed.numel(), generator=g).topk(topk, dim=1).indices]
    w = torch.rand(tokens, topk, generator=g) + 0.1
    w = w / w.sum(dim=1, keepdim=True)
    flat = idx.view(-1)
    chosen = torch.randperm(flat.numel(), generator=g)[:masked]
    flat[chosen] = -1
    w.view(-1)[chosen] = 0.0
    return idx, w


def make_inputs(call: dict[str, Any], num_experts: int, salt: int) -> tuple[torch.Tensor, ...]:
    rank, _ = rank_and_world()
    g = generator(salt)
    tokens = call["tokens"][rank]
    x = random_x(tokens, call["hidden"], g)
    if call["routing"] == "no-expert0":
        idx, w = routing_avoiding_first_local_expert(tokens, num_experts, call["topk"], g, call["masked"])
        for b in range(min(call.get("masked_rows", 0), tokens)):
            idx[(b * 5) % tokens] = -1
    else:
        idx, w = routing_for_call(call, tokens, num_experts, g, row_stride=5)
    return x, idx, w


def check_ll_dispatch(
    group: ncclep.Group,
    x: torch.Tensor,
    idx: torch.Tensor,
    w: torch.Tensor,
    use_fp8: bool,
    ue8m0: bool,
    what: str,
    out: ncclep.LLDispatchOutput | None = None,
) -> tuple[ncclep.LLDispatchOutput, list[testing.RankInputs]]:
    """One dispatch (or the given result of one) compared bit for bit with the oracle."""
    if out is None:
        out = step(group.ll_dispatch, x, idx, w, use_fp8=use_fp8, ue8m0=ue8m0)
    inputs = testing.gather_inputs(group.process_group, x, idx, w)
    step(verify_ll_dispatch, group, out, inputs, idx, use_fp8, ue8m0, what)
    return out, inputs


def verify_ll_dispatch(
    group: ncclep.Group,
    out: ncclep.LLDispatchOutput,
    inputs: list[testing.RankInputs],
    idx: torch.Tensor,
    use_fp8: bool,
    ue8m0: bool,
    what: str,
) -> None:
    rank, world = rank_and_world()
    cfg = group.config
    local, slots, kmax = cfg.num_local_experts, cfg.max_tokens_per_rank, cfg.max_topk
    rows, hidden, topk = world * slots, inputs[rank].x.shape[1], idx.shape[1]
    expected = testing.ll_dispatch_expected(cfg, rank, inputs, use_fp8, ue8m0)

    assert out.x.shape == (local, rows, hidden), what
    assert out.x.dtype == (fp8.FP8_DTYPE if use_fp8 else torch.bfloat16), what
    if use_fp8:
        assert out.scales is not None
        assert out.scales.shape == (local, rows, hidden // 128), what
        assert out.scales.dtype == (fp8.UE8M0_DTYPE if ue8m0 else torch.float32), what
    else:
        assert out.scales is None, what
    assert out.expert_counts.dtype == torch.int32 and out.expert_counts.shape == (local,), what
    assert out.expert_counts.tolist() == [len(e) for e in expected], f"{what}: expert_counts"

    position: dict[tuple[int, int, int], int] = {}
    for e, exp_rows in enumerate(expected):
        keys = [(r.src, r.token) for r in exp_rows]
        assert keys == sorted(keys), "oracle rows must be ordered by (source rank, token)"
        for i, (src, token) in enumerate(keys):
            position[(e, src, token)] = i
        n = len(exp_rows)
        if n == 0:
            continue
        # random payloads are distinct, so bit equality of the stacked rows also checks row order
        exp_x = torch.stack([r.payload for r in exp_rows])
        assert_bits_equal(out.x[e, :n], exp_x, f"{what}: x of expert {e}")
        if use_fp8:
            exp_scales = torch.stack([r.scales for r in exp_rows])
            assert_bits_equal(out.scales[e, :n], exp_scales, f"{what}: scales of expert {e}")

    h = out.handle
    assert h.send_slots.dtype == torch.int32
    assert_bits_equal(h.send_slots, expected_send_slots(idx.long(), local, world), f"{what}: send_slots")
    assert h.recv_rows.shape == (world, slots, kmax) and h.recv_rows.dtype == torch.int32, what
    assert h.recv_weights.shape == (world, slots, kmax) and h.recv_weights.dtype == torch.float32, what
    assert h.recv_slot_counts.shape == (world,) and h.recv_slot_counts.dtype == torch.int32, what
    from_rank = [tokens_to(inputs[r].topk_idx, rank, local) for r in range(world)]
    assert h.recv_slot_counts.tolist() == [len(t) for t in from_rank], f"{what}: recv_slot_counts"
    for src, tokens in enumerate(from_rank):
        exp_rows_t = torch.full((len(tokens), kmax), -1, dtype=torch.int32)
        exp_w = torch.zeros((len(tokens), kmax), dtype=torch.float32)
        for slot, b in enumerate(tokens):
            for k in range(topk):
                e = int(inputs[src].topk_idx[b, k])
                if e >= 0 and owner(e, local) == rank:
                    le = e - rank * local
                    exp_rows_t[slot, k] = le * rows + position[(le, src, b)]
                    exp_w[slot, k] = inputs[src].topk_weights[b, k]
        n = len(tokens)
        assert_bits_equal(h.recv_rows[src, :n], exp_rows_t, f"{what}: recv_rows from rank {src}")
        assert_bits_equal(h.recv_weights[src, :n], exp_w, f"{what}: recv_weights from rank {src}")


def synthetic_expert_out(group: ncclep.Group, out: ncclep.LLDispatchOutput) -> torch.Tensor:
    """Expert e's output row = bf16(value * (global e + 1) / E); padding rows hold garbage."""
    rank, _ = rank_and_world()
    cfg = group.config
    values = fp8.dequantize(out.x, out.scales) if out.scales is not None else out.x.float()
    factors = torch.stack([expert_factor(rank * cfg.num_local_experts + e, cfg.num_experts)
                           for e in range(cfg.num_local_experts)])  # fmt: skip
    expert_out = (values * factors[:, None, None]).to(torch.bfloat16)
    garbage = torch.tensor([float("nan"), 1e30, -float("inf"), -1e30], dtype=torch.bfloat16)
    for e, n in enumerate(out.expert_counts.tolist()):
        pad = expert_out[e, n:]
        pad.copy_(garbage.repeat(pad.numel() // 4 + 1)[: pad.numel()].view_as(pad))
    return expert_out


def check_ll_combine(
    group: ncclep.Group,
    expert_out: torch.Tensor,
    handle: ncclep.LLHandle,
    inputs: list[testing.RankInputs],
    use_fp8: bool,
    ue8m0: bool,
    what: str,
    result: torch.Tensor | None = None,
) -> torch.Tensor:
    if result is None:
        result = step(group.ll_combine, expert_out, handle)
    step(verify_ll_combine, group, result, inputs, use_fp8, ue8m0, what)
    return result


def verify_ll_combine(
    group: ncclep.Group,
    result: torch.Tensor,
    inputs: list[testing.RankInputs],
    use_fp8: bool,
    ue8m0: bool,
    what: str,
) -> None:
    rank, _ = rank_and_world()
    cfg = group.config
    mine = inputs[rank]
    assert result.shape == mine.x.shape and result.dtype == torch.bfloat16, what

    def expert_fn(e: int, row: torch.Tensor) -> torch.Tensor:
        return (dequantized_row(row, use_fp8, ue8m0) * expert_factor(e, cfg.num_experts)).to(torch.bfloat16)

    assert mine.topk_weights is not None and bool((mine.topk_weights >= 0).all())
    ref = testing.ll_combine_expected(cfg, rank, inputs, expert_fn)
    ref_abs = testing.ll_combine_expected(cfg, rank, inputs, lambda e, row: expert_fn(e, row).abs())
    check_close(result, ref, ref_abs, f"{what}: ll_combine")
    for b in range(mine.x.shape[0]):
        if bool((mine.topk_idx[b] < 0).all()):
            assert bool((result[b] == 0).all()), f"{what}: fully masked token {b} must combine to zeros"


def make_group(num_experts: int) -> ncclep.Group:
    return ncclep.Group(num_experts, TOKENS, HIDDEN, mode="ll", max_topk=MAX_TOPK, backend="reference")


def check_out_variant(returned: torch.Tensor, buf: torch.Tensor, plain: torch.Tensor, what: str) -> None:
    assert returned is buf, f"{what}: out= must return the given tensor"
    assert_bits_equal(buf, plain, f"{what}: out= result")


# ------------------------------------------------------------------------------------- workers


def _ll_dispatch_worker(world_size: int, precision: str) -> int:
    use_fp8, ue8m0 = PRECISIONS[precision]
    num_experts = num_experts_for(world_size)
    checked = 0
    with make_group(num_experts) as group:
        for i, call in enumerate(ll_calls(world_size)):
            x, idx, w = make_inputs(call, num_experts, salt=i)
            check_ll_dispatch(group, x, idx, w, use_fp8, ue8m0, f"call {i} {call}")
            checked += 1
    return checked


def _ll_combine_worker(world_size: int, precision: str) -> int:
    use_fp8, ue8m0 = PRECISIONS[precision]
    num_experts = num_experts_for(world_size)
    checked = 0
    with make_group(num_experts) as group:
        for i, call in enumerate(ll_calls(world_size)):
            x, idx, w = make_inputs(call, num_experts, salt=100 + i)
            what = f"call {i} {call}"
            out = step(group.ll_dispatch, x, idx, w, use_fp8=use_fp8, ue8m0=ue8m0)
            inputs = testing.gather_inputs(group.process_group, x, idx, w)
            expert_out = synthetic_expert_out(group, out)
            plain = check_ll_combine(group, expert_out, out.handle, inputs, use_fp8, ue8m0, what)
            # out=: writes into the given tensor (pre-filled with garbage) and returns it
            buf = torch.full_like(plain, float("nan"))
            returned = step(group.ll_combine, expert_out, out.handle, out=buf)
            step(check_out_variant, returned, buf, plain, what)
            checked += 1
    return checked


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("world_name", ["world2", "world3", "world4"])
def test_ll_dispatch_matches_oracle(world_name: str, precision: str, request: pytest.FixtureRequest) -> None:
    pool = request.getfixturevalue(world_name)
    counts = pool.run(_ll_dispatch_worker, pool.world_size, precision)
    assert counts == [len(ll_calls(pool.world_size))] * pool.world_size


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("world_name", ["world2", "world3", "world4"])
def test_ll_combine_matches_oracle(world_name: str, precision: str, request: pytest.FixtureRequest) -> None:
    pool = request.getfixturevalue(world_name)
    counts = pool.run(_ll_combine_worker, pool.world_size, precision)
    assert counts == [len(ll_calls(pool.world_size))] * pool.world_size


def _column_major_worker(world_size: int) -> int:
    """Column-major scales (fp32, and packed UE8M0) hold the row-major dispatch's values, laid out as
    ``outputs.ll_scales_spec`` says, on the eager path, through the op, and with send_only."""
    num_experts = num_experts_for(world_size)
    checked = 0
    with make_group(num_experts) as group:
        for i, hidden in enumerate((512, 1024)):
            call = dict(routing="random", topk=8, hidden=hidden, tokens=[TOKENS] * world_size, masked=5)
            x, idx, w = make_inputs(call, num_experts, salt=300 + i)
            for ue8m0 in (False, True):
                rows = group.ll_dispatch(x, idx, w, use_fp8=True, ue8m0=ue8m0)
                wanted = fp8.column_major(fp8.pack_ue8m0(rows.scales) if ue8m0 else rows.scales)
                used = torch.arange(wanted.shape[1]) < rows.expert_counts.unsqueeze(1)  # padding: unspecified
                column = dict(use_fp8=True, ue8m0=ue8m0, column_major_scales=True)
                eager = group.ll_dispatch(x, idx, w, **column).scales
                via_op = torch.ops.ncclep.ll_dispatch(group.id, x, idx, w, True, ue8m0, True)[1]
                halves = group.ll_dispatch(x, idx, w, send_only=True, **column).wait().scales
                for got in (eager, via_op, halves):
                    assert got.dtype == (torch.int32 if ue8m0 else torch.float32)
                    assert (
                        got.shape == wanted.shape and got.stride() == wanted.stride() and got.stride()[1] == 1
                    )
                    same = got.contiguous().view(torch.uint8) == wanted.contiguous().view(torch.uint8)
                    assert bool(same.all(dim=-1)[used].all()), "values differ on rows in use"
                checked += 1
        with pytest.raises(ncclep.InvalidArgument, match="needs use_fp8"):
            group.ll_dispatch(x, idx, w, column_major_scales=True)
        x384 = x[:, :384].contiguous()
        with pytest.raises(ncclep.InvalidArgument, match="divisible by 512"):
            group.ll_dispatch(x384, idx, w, use_fp8=True, ue8m0=True, column_major_scales=True)
        # a refused call leaves the group usable
        assert group.ll_dispatch(x384, idx, w, use_fp8=True, column_major_scales=True).scales.stride()[1] == 1
    return checked


def test_ll_dispatch_column_major_scales(world2: Any) -> None:
    assert world2.run(_column_major_worker, 2) == [4, 4]


def _round_scale_worker(world_size: int) -> int:
    """round_scale: the fp8 rows of the ue8m0 dispatch and its scales as fp32 powers of two (the
    bytes as torch converts them), row-major and column-major, eager, through the op and with
    send_only; asked for without fp8 or with ue8m0, refused."""
    num_experts = num_experts_for(world_size)
    checked = 0
    with make_group(num_experts) as group:
        for i, hidden in enumerate((384, 1024)):
            call = dict(routing="random", topk=8, hidden=hidden, tokens=[TOKENS] * world_size, masked=5)
            x, idx, w = make_inputs(call, num_experts, salt=700 + i)
            ue8m0 = group.ll_dispatch(x, idx, w, use_fp8=True, ue8m0=True)
            used = torch.arange(ue8m0.x.shape[1]) < ue8m0.expert_counts.unsqueeze(1)  # padding: unspecified
            for column_major in (False, True):
                wanted = ue8m0.scales.float()
                if column_major:
                    wanted = fp8.column_major(wanted)
                asked = dict(use_fp8=True, column_major_scales=column_major, round_scale=True)
                eager = group.ll_dispatch(x, idx, w, **asked)
                via_op = outputs.ll_dispatch_output(
                    torch.ops.ncclep.ll_dispatch(group.id, x, idx, w, True, False, column_major, True)
                )
                halves = group.ll_dispatch(x, idx, w, send_only=True, **asked).wait()
                for got in (eager, via_op, halves):
                    same_x = got.x.view(torch.uint8) == ue8m0.x.view(torch.uint8)
                    assert bool(same_x.all(dim=-1)[used].all()), "fp8 rows differ from ue8m0's"
                    s = got.scales
                    assert s.dtype == torch.float32
                    assert s.shape == wanted.shape and s.stride() == wanted.stride()
                    bits = s.contiguous().view(torch.int32)
                    assert bool((bits == wanted.contiguous().view(torch.int32)).all(dim=-1)[used].all())
                    assert bool(((bits & 0x7FFFFF) == 0)[used].all()), "fp32 powers of two"
                checked += 1
        for bad in (dict(round_scale=True), dict(use_fp8=True, ue8m0=True, round_scale=True)):
            with pytest.raises(ncclep.InvalidArgument, match="round_scale"):
                group.ll_dispatch(x, idx, w, **bad)
        assert group.ll_dispatch(x, idx, w, use_fp8=True, round_scale=True).scales.dtype == torch.float32
    return checked


def test_ll_dispatch_round_scale(world2: Any) -> None:
    assert world2.run(_round_scale_worker, 2) == [4, 4]


def _combine_weights_worker(world_size: int) -> int:
    """Weights given to the combine replace the dispatch's: the oracle of a dispatch that carried
    them, on the eager path, through the op, with send_only, and with fewer columns than top-k."""
    num_experts = num_experts_for(world_size)
    checked = 0
    with make_group(num_experts) as group:
        for i, call in enumerate(ll_calls(world_size)[:4]):
            x, idx, w = make_inputs(call, num_experts, salt=500 + i)
            given = torch.rand(w.shape, generator=generator(600 + i))
            if i % 2 == 1 and w.shape[1] > 1:  # the last column left out: its choice weighs 0
                given = given[:, :-1].contiguous()
            out = step(group.ll_dispatch, x, idx, w)
            full = torch.cat([given, given.new_zeros(w.shape[0], w.shape[1] - given.shape[1])], dim=1)
            inputs = testing.gather_inputs(group.process_group, x, idx, full)
            expert_out = synthetic_expert_out(group, out)
            what = f"call {i} {call}, weights at the combine"
            result = step(group.ll_combine, expert_out, out.handle, topk_weights=given)
            check_ll_combine(group, expert_out, out.handle, inputs, False, False, what, result)
            via_op = torch.ops.ncclep.ll_combine(group.id, expert_out, *out.handle.tensors(), given)
            halves = group.ll_combine(expert_out, out.handle, send_only=True, topk_weights=given).wait()
            for got in (via_op, halves):
                assert_bits_equal(got, result, f"{what}: op / send_only")
            checked += 1
        with pytest.raises(ncclep.InvalidArgument, match="topk_weights must be"):
            group.ll_combine(expert_out, out.handle, topk_weights=given[:1])
        with pytest.raises(ncclep.InvalidArgument, match="dtype"):
            group.ll_combine(expert_out, out.handle, topk_weights=given.double())
    return checked


def test_ll_combine_weights_given_to_the_combine(world2: Any) -> None:
    assert world2.run(_combine_weights_worker, 2) == [4, 4]
