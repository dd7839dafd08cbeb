"""HT dispatch and combine against the per-token oracles of ncclep.testing (world sizes 2, 3, 4)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import (
    assert_bits_equal,
    check_close,
    expected_send_slots,
    generator,
    random_x,
    rank_and_world,
    routing_for_call,
    step,
    tokens_to,
)

import ncclep
from ncclep import fp8, testing

HIDDEN = 1160  # HT bf16 takes any multiple of 8; fp8 calls use multiples of 128 below it
MAX_TOPK = 16
TOKENS = 16
PRECISIONS = {"bf16": None, "fp8": False, "fp8-ue8m0": True}  # value: ue8m0 of the pre-quantised x


def num_experts_for(world: int) -> int:
    return {2: 32, 3: 24, 4: 32}[world]


def expected_num_rows(world: int, local: int, topk: int, layout: str, alignment: int) -> int:
    """Worst-case N, written out independently of GroupConfig.ht_num_rows."""
    if layout == "flat":
        return world * TOKENS
    return world * TOKENS * min(topk, local) + local * (alignment - 1)


def ht_calls(world: int, precision: str) -> list[dict[str, Any]]:
    local = num_experts_for(world) // world
    t = TOKENS
    h = [72, HIDDEN, 264] if precision == "bf16" else [128, 1152, 384]
    some = [0 if r == 1 else t - 2 * r for r in range(world)]  # rank 1 sends nothing
    return [
        dict(layout="flat", alignment=1, routing="random", topk=8, hidden=h[1], tokens=[t] * world,
             masked=6, weights=True),
        dict(layout="expert_major", alignment=1, routing="skewed", topk=16, hidden=h[0], tokens=some,
             weights=False),
        dict(layout="expert_major", alignment=16, routing="hot", topk=min(8, local), hidden=h[2],
             tokens=[t // 2 + r for r in range(world)], hot_rank=world - 1, weights=True),
        dict(layout="expert_major", alignment=128, routing="uniform", topk=1, hidden=h[1],
             tokens=[t] * world, masked=2, int32=True, weights=True),
        # the hot rank itself has no tokens
        dict(layout="flat", alignment=1, routing="hot", topk=1, hidden=h[0], tokens=[0] + [t] * (world - 1),
             hot_rank=0, weights=False),
        dict(layout="expert_major", alignment=16, routing="random", topk=16, hidden=h[1],
             tokens=[t - r for r in range(world)], masked=30, masked_rows=2, weights=True),
        dict(layout="flat", alignment=1, routing="skewed", topk=16, hidden=h[2], tokens=some, masked=10,
             masked_rows=1, int32=True, weights=True),
        dict(layout="expert_major", alignment=128, routing="skewed", topk=8, hidden=h[0],
             tokens=[t] * world, weights=False),
    ]  # fmt: skip


def make_inputs(call: dict[str, Any], num_experts: int, ue8m0: bool | None, salt: int) -> dict[str, Any]:
    rank, _ = rank_and_world()
    g = generator(salt)
    tokens = call["tokens"][rank]
    x = random_x(tokens, call["hidden"], g)
    idx, w = routing_for_call(call, tokens, num_experts, g, row_stride=3)
    scales = None
    if ue8m0 is not None:
        x, scales = fp8.quantize(x, ue8m0)
    return dict(x=x, x_scales=scales, topk_idx=idx, topk_weights=w if call["weights"] else None)


def dispatch(group: ncclep.Group, inp: dict[str, Any], call: dict[str, Any]) -> ncclep.HTDispatchOutput:
    return step(group.ht_dispatch, **inp, layout=call["layout"], alignment=call["alignment"])


def verify_ht_dispatch(
    group: ncclep.Group,
    out: ncclep.HTDispatchOutput,
    inputs: list[testing.RankInputs],
    all_scales: list[torch.Tensor | None],
    inp: dict[str, Any],
    call: dict[str, Any],
    what: str,
) -> None:
    rank, world = rank_and_world()
    cfg = group.config
    local = cfg.num_local_experts
    layout, alignment = call["layout"], call["alignment"]
    x = inp["x"]
    topk, hidden = inp["topk_idx"].shape[1], x.shape[1]
    n = expected_num_rows(world, local, topk, layout, alignment)
    assert cfg.ht_num_rows(topk, layout, alignment) == n, what

    assert out.x.shape == (n, hidden) and out.x.dtype == x.dtype, what
    if inp["x_scales"] is None:
        assert out.scales is None, what
    else:
        assert out.scales.shape == (n, hidden // 128) and out.scales.dtype == inp["x_scales"].dtype, what
    idx_dtype = inp["topk_idx"].dtype  # the received ids keep it
    assert out.topk_idx.shape == (n, topk) and out.topk_idx.dtype == idx_dtype, what
    if inp["topk_weights"] is None:
        assert out.topk_weights is None, what
    else:
        assert out.topk_weights.shape == (n, topk) and out.topk_weights.dtype == torch.float32, what
    assert out.num_recv.shape == (1,) and out.num_recv.dtype == torch.int32, what
    assert out.expert_counts.shape == (local,) and out.expert_counts.dtype == torch.int32, what

    rows, counts = testing.ht_dispatch_expected(cfg, rank, inputs, layout, alignment)
    assert out.num_recv.tolist() == [len(rows)], f"{what}: num_recv"
    assert out.expert_counts.tolist() == counts, f"{what}: expert_counts"

    h = out.handle
    assert_bits_equal(
        h.send_pos, expected_send_slots(inp["topk_idx"].long(), local, world), f"{what}: send_pos"
    )
    from_rank = [tokens_to(inputs[r].topk_idx, rank, local) for r in range(world)]
    assert h.recv_counts.tolist() == [len(t) for t in from_rank], f"{what}: recv_counts"
    slot_of = {(r, b): s for r in range(world) for s, b in enumerate(from_rank[r])}
    assert h.recv_slot.shape == (n,) and h.recv_slot.dtype == torch.int32, what
    assert torch.equal(h.recv_topk_idx, out.topk_idx), f"{what}: handle.recv_topk_idx"

    valid = [i for i, r in enumerate(rows) if r is not None]
    empty = [i for i, r in enumerate(rows) if r is None] + list(range(len(rows), n))
    if valid:
        held = [rows[i] for i in valid]
        at = torch.tensor(valid)
        exp_x = torch.stack([inputs[r.src].x[r.token] for r in held])
        assert_bits_equal(out.x[at], exp_x, f"{what}: x")
        if out.scales is not None:
            exp_s = torch.stack([all_scales[r.src][r.token] for r in held])
            assert_bits_equal(out.scales[at], exp_s, f"{what}: scales")
        exp_idx = torch.tensor([r.local_ids for r in held], dtype=idx_dtype)
        assert_bits_equal(out.topk_idx[at], exp_idx, f"{what}: topk_idx")
        if out.topk_weights is not None:
            exp_w = torch.tensor([r.weights for r in held], dtype=torch.float32)
            assert_bits_equal(out.topk_weights[at], exp_w, f"{what}: topk_weights")
        exp_slot = torch.tensor([r.src * TOKENS + slot_of[(r.src, r.token)] for r in held], dtype=torch.int32)
        assert_bits_equal(h.recv_slot[at], exp_slot, f"{what}: recv_slot")
    if empty:
        # alignment padding and the unused tail: no token, no expert
        at = torch.tensor(empty)
        assert bool((out.topk_idx[at] == -1).all()), f"{what}: padding rows need topk_idx -1"
        assert bool((h.recv_slot[at] == -1).all()), f"{what}: padding rows need recv_slot -1"


def row_factor(dest: int, local_expert: int | None, num_experts: int, world: int) -> torch.Tensor:
    """What the synthetic expert rank multiplies a row by: per rank (flat) or per expert."""
    if local_expert is None:
        value = (dest + 1) / (world + 1)
    else:
        value = (dest * (num_experts // world) + local_expert + 1) / num_experts
    return torch.tensor(value, dtype=torch.float32)


def segment_of_rows(out: ncclep.HTDispatchOutput, alignment: int) -> torch.Tensor:
    """expert_major: the local expert whose segment each row is in (-1 past the last segment)."""
    counts = out.expert_counts.long()
    padded = (counts + alignment - 1) // alignment * alignment
    seg = torch.repeat_interleave(torch.arange(counts.numel()), padded)
    full = torch.full((out.x.shape[0],), -1, dtype=torch.long)
    full[: seg.numel()] = seg
    return full


def synthetic_combine_input(
    group: ncclep.Group, out: ncclep.HTDispatchOutput, call: dict[str, Any]
) -> torch.Tensor:
    rank, world = rank_and_world()
    n = out.x.shape[0]
    if call["layout"] == "flat":
        factors = row_factor(rank, None, group.num_experts, world).expand(n)
    else:
        seg = segment_of_rows(out, call["alignment"])
        factors = torch.stack([row_factor(rank, int(e), group.num_experts, world) for e in seg.clamp_min(0)])
    y = (out.x.float() * factors[:, None]).to(torch.bfloat16)
    y[out.handle.recv_slot < 0] = float("nan")  # padding rows: garbage that must not leak
    return y


def verify_ht_combine(
    group: ncclep.Group,
    result: torch.Tensor,
    inputs: list[testing.RankInputs],
    call: dict[str, Any],
    what: str,
) -> None:
    rank, world = rank_and_world()
    cfg = group.config
    mine = inputs[rank]
    assert result.shape == mine.x.shape and result.dtype == torch.bfloat16, what

    def row_fn(dest: int, local_expert: int | None, x_row: torch.Tensor) -> torch.Tensor:
        return (x_row.float() * row_factor(dest, local_expert, cfg.num_experts, world)).to(torch.bfloat16)

    ref = testing.ht_combine_expected(cfg, rank, inputs, call["layout"], row_fn)
    ref_abs = testing.ht_combine_expected(
        cfg, rank, inputs, call["layout"], lambda d, e, r: row_fn(d, e, r).abs()
    )
    check_close(result, ref, ref_abs, f"{what}: ht_combine")
    for b in range(mine.x.shape[0]):
        if bool((mine.topk_idx[b] < 0).all()):
            assert bool((result[b] == 0).all()), f"{what}: fully masked token {b} must combine to zeros"


def verify_combined_weights(
    group: ncclep.Group,
    weights_out: torch.Tensor | None,
    sent: list[torch.Tensor | None],
    inputs: list[testing.RankInputs],
    call: dict[str, Any],
    exact: bool,
    what: str,
) -> None:
    """[B, K] = sum over every rank's rows of this rank's tokens of the entries with a local id."""
    rank, world = rank_and_world()
    cfg = group.config
    mine = inputs[rank]
    assert weights_out is not None, what
    assert weights_out.shape == mine.topk_idx.shape and weights_out.dtype == torch.float32, what
    expected = torch.zeros(mine.topk_idx.shape, dtype=torch.float64)
    for d in range(world):
        rows, _ = testing.ht_dispatch_expected(cfg, d, inputs, call["layout"], call["alignment"])
        w_d = sent[d]
        assert w_d is not None
        for i, row in enumerate(rows):
            if row is not None and row.src == rank:
                for k, lid in enumerate(row.local_ids):
                    if lid >= 0:
                        expected[row.token, k] += float(w_d[i, k])
    if exact:
        assert_bits_equal(weights_out, expected.float(), f"{what}: combined topk_weights")
    else:
        assert torch.allclose(weights_out.double(), expected, rtol=1e-6, atol=1e-7), f"{what}: weights"


# ------------------------------------------------------------------------------------- workers


def make_group(num_experts: int) -> ncclep.Group:
    return ncclep.Group(num_experts, TOKENS, HIDDEN, mode="ht", max_topk=MAX_TOPK, backend="reference")


def _ht_dispatch_worker(world_size: int, precision: str) -> int:
    ue8m0 = PRECISIONS[precision]
    num_experts = num_experts_for(world_size)
    calls = ht_calls(world_size, precision)
    with make_group(num_experts) as group:
        for i, call in enumerate(calls):
            inp = make_inputs(call, num_experts, ue8m0, salt=i)
            out = dispatch(group, inp, call)
            inputs = testing.gather_inputs(
                group.process_group, inp["x"], inp["topk_idx"], inp["topk_weights"]
            )
            all_scales = testing.gather_tensor(group.process_group, inp["x_scales"])
            step(verify_ht_dispatch, group, out, inputs, all_scales, inp, call, f"call {i} {call}")
    return len(calls)


def _ht_combine_worker(world_size: int, layout: str) -> int:
    num_experts = num_experts_for(world_size)
    calls = [c for c in ht_calls(world_size, "bf16") if c["layout"] == layout]
    with make_group(num_experts) as group:
        for i, call in enumerate(calls):
            what = f"call {i} {call}"
            inp = make_inputs(call, num_experts, None, salt=200 + i)
            out = dispatch(group, inp, call)
            inputs = testing.gather_inputs(
                group.process_group, inp["x"], inp["topk_idx"], inp["topk_weights"]
            )
            y = synthetic_combine_input(group, out, call)
            result, none_weights = step(group.ht_combine, y, out.handle)
            assert none_weights is None, what
            step(verify_ht_combine, group, result, inputs, call, what)

            # combined weights, 1: the dispatched weights come back as a sum over the token's rows
            # (flat: one row per rank, so exactly the original non-masked weights)
            if out.topk_weights is not None:
                result2, back = step(group.ht_combine, y, out.handle, topk_weights=out.topk_weights)
                step(assert_bits_equal, result2, result, f"{what}: combine with weights")
                sent = testing.gather_tensor(group.process_group, out.topk_weights)
                exact = layout == "flat"
                step(verify_combined_weights, group, back, sent, inputs, call, exact, what)
                if exact:
                    orig = inp["topk_weights"]
                    mask = inp["topk_idx"] >= 0
                    step(assert_bits_equal, back, torch.where(mask, orig, 0.0), f"{what}: round trip")

            if layout == "flat":  # only the used rows (the rest hold no token): the same sums
                n = int(out.num_recv[0])
                w_head = None if out.topk_weights is None else out.topk_weights[:n]
                head, _ = step(group.ht_combine, y[:n], out.handle, topk_weights=w_head)
                step(assert_bits_equal, head, result, f"{what}: combine of the first {n} rows")

            # combined weights, 2: fresh random [N, K] weights, garbage where no local expert
            g = generator(300 + i)
            w_rows = torch.rand(out.topk_idx.shape, generator=g) - 0.25
            w_rows[out.topk_idx < 0] = 1e30
            w_rows[out.handle.recv_slot < 0] = float("nan")
            _, back = step(group.ht_combine, y, out.handle, topk_weights=w_rows)
            sent = testing.gather_tensor(group.process_group, w_rows)
            step(verify_combined_weights, group, back, sent, inputs, call, False, what)
    return len(calls)


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("world_name", ["world2", "world3", "world4"])
def test_ht_dispatch_matches_oracle(world_name: str, precision: str, request: pytest.FixtureRequest) -> None:
    pool = request.getfixturevalue(world_name)
    counts = pool.run(_ht_dispatch_worker, pool.world_size, precision)
    assert counts == [len(ht_calls(pool.world_size, precision))] * pool.world_size


@pytest.mark.parametrize("layout", ["flat", "expert_major"])
@pytest.mark.parametrize("world_name", ["world2", "world3", "world4"])
def test_ht_combine_matches_oracle(world_name: str, layout: str, request: pytest.FixtureRequest) -> None:
    pool = request.getfixturevalue(world_name)
    counts = pool.run(_ht_combine_worker, pool.world_size, layout)
    assert all(c > 0 for c in counts)
