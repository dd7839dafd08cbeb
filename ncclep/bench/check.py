"""``--validate``: one call of each op against the oracle of :mod:`ncclep.testing`.

The oracle loops over tokens in Python, so cases above ``ORACLE_LIMIT`` tokens in total are
compared against the reference backend instead (which the test suite checks against the oracle).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import fp8, testing
from ..group import Group
from .workloads import Case

ORACLE_LIMIT = 4096
COMBINE_TOLERANCE = testing.COMBINE_TOLERANCE


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return testing.relative_error(out.cpu(), ref.cpu())


def _check_ll(group: Group, case: Case, inp: Any) -> str | None:
    cfg, rank = group.config, group.rank
    use_fp8 = case.dtype == "fp8"
    out = group.ll_dispatch(inp.x, inp.topk_idx, inp.topk_weights, use_fp8=use_fp8)
    world = testing.gather_inputs(group.process_group, inp.x, inp.topk_idx, inp.topk_weights)
    expected = testing.ll_dispatch_expected(cfg, rank, world, use_fp8, False)
    counts = out.expert_counts.cpu().tolist()
    for e, rows in enumerate(expected):
        if counts[e] != len(rows):
            return f"expert {e}: {counts[e]} rows, expected {len(rows)}"
        if rows:
            got = out.x[e, : len(rows)].cpu()
            want = torch.stack([r.payload for r in rows])
            if not torch.equal(got.view(torch.uint8), want.view(torch.uint8)):
                return f"expert {e}: payload differs"
    fn = testing.scaled_expert(cfg.num_experts)
    dense = out.x.float() if not use_fp8 else fp8.dequantize(out.x, out.scales)
    expert_out = torch.stack(
        [fn(rank * cfg.num_local_experts + e, dense[e]) for e in range(cfg.num_local_experts)]
    )
    combined = group.ll_combine(expert_out, out.handle)
    reference_world = world
    if use_fp8:  # the experts saw dequantised rows: give the oracle the same inputs
        reference_world = [
            testing.RankInputs(fp8.dequantize(*fp8.quantize(w.x)), w.topk_idx, w.topk_weights) for w in world
        ]
    ref = testing.ll_combine_expected(cfg, rank, reference_world, fn)
    err = _relative_error(combined, ref)
    return None if err < COMBINE_TOLERANCE else f"combine relative error {err:.2e}"


def _check_ht(group: Group, case: Case, inp: Any) -> str | None:
    cfg, rank = group.config, group.rank
    out = group.ht_dispatch(inp.x, inp.topk_idx, inp.topk_weights, x_scales=inp.x_scales)
    world = testing.gather_inputs(group.process_group, inp.x, inp.topk_idx, inp.topk_weights)
    rows, counts = testing.ht_dispatch_expected(cfg, rank, world, "flat", 1)
    if out.expert_counts.cpu().tolist() != counts or int(out.num_recv) != len(rows):
        return "counts differ"
    for n, row in enumerate(rows):
        assert row is not None
        want = world[row.src].x[row.token]
        if not torch.equal(out.x[n].cpu().view(torch.uint8), want.view(torch.uint8)):
            return f"row {n} payload differs"
        if out.topk_idx[n].cpu().tolist() != row.local_ids:
            return f"row {n} expert ids differ"
    dense = out.x.float() if inp.x_scales is None else fp8.dequantize(out.x, out.scales)
    combined, _ = group.ht_combine((dense * (rank + 1)).to(torch.bfloat16), out.handle)
    reference_world = world
    if inp.x_scales is not None:
        scales = testing.gather_tensor(group.process_group, inp.x_scales)
        reference_world = [
            testing.RankInputs(fp8.dequantize(w.x, s), w.topk_idx, w.topk_weights)
            for w, s in zip(world, scales, strict=True)
        ]
    ref = testing.ht_combine_expected(
        cfg, rank, reference_world, "flat", lambda d, _e, x: (x.float() * (d + 1)).to(torch.bfloat16)
    )
    err = _relative_error(combined, ref)
    return None if err < COMBINE_TOLERANCE else f"combine relative error {err:.2e}"


def _check_against_reference(group: Group, case: Case, inp: Any) -> str | None:
    with Group(
        case.experts,
        case.tokens,
        case.hidden,
        mode=case.mode,
        process_group=group.process_group,
        max_topk=group.config.max_topk,
        backend="reference",
    ) as ref_group:
        if case.mode == "ll":
            use_fp8 = case.dtype == "fp8"
            a = group.ll_dispatch(inp.x, inp.topk_idx, inp.topk_weights, use_fp8=use_fp8)
            b = ref_group.ll_dispatch(inp.x, inp.topk_idx, inp.topk_weights, use_fp8=use_fp8)
            if not torch.equal(a.expert_counts, b.expert_counts):
                return "expert counts differ from the reference"
            for e, n in enumerate(b.expert_counts.tolist()):
                if not torch.equal(a.x[e, :n].view(torch.uint8), b.x[e, :n].view(torch.uint8)):
                    return f"expert {e} rows differ from the reference"
            y = torch.randn_like(a.x, dtype=torch.float32).to(torch.bfloat16)
            err = _relative_error(group.ll_combine(y, a.handle), ref_group.ll_combine(y, b.handle))
        else:
            a = group.ht_dispatch(inp.x, inp.topk_idx, inp.topk_weights, x_scales=inp.x_scales)
            b = ref_group.ht_dispatch(inp.x, inp.topk_idx, inp.topk_weights, x_scales=inp.x_scales)
            n = int(b.num_recv)
            if int(a.num_recv) != n or not torch.equal(a.x[:n].view(torch.uint8), b.x[:n].view(torch.uint8)):
                return "dispatched rows differ from the reference"
            y = torch.randn(a.x.shape, device=a.x.device).to(torch.bfloat16)
            err = _relative_error(group.ht_combine(y, a.handle)[0], ref_group.ht_combine(y, b.handle)[0])
    return None if err < COMBINE_TOLERANCE else f"combine differs from the reference by {err:.2e}"


def check_case(group: Group, case: Case, inp: Any) -> str:
    """'ok', 'skipped: why', or 'FAILED: what differs'."""
    if group.backend != "reference":
        problem = _check_against_reference(group, case, inp)
    elif case.tokens * group.world_size > ORACLE_LIMIT:
        return f"skipped: the oracle takes at most {ORACLE_LIMIT} tokens in all"
    elif case.mode == "ll":
        problem = _check_ll(group, case, inp)
    else:
        problem = _check_ht(group, case, inp)
    return "ok" if problem is None else f"FAILED: {problem}"
