"""HT backward: gradients through dispatch -> experts -> combine equal a dense computation's."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import ncclep
from ncclep import testing
from ncclep.workloads import make_routing

EXPERTS, T, HIDDEN = 12, 16, 64


def _expert_rows(rows: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, rank: int) -> torch.Tensor:
    """What rank `rank` does to its rows: a scale per rank plus the sum of the local weights."""
    local_w = torch.where(idx >= 0, weights, 0.0).sum(dim=1, keepdim=True)
    return (rows.float() * (0.5 + rank) + local_w).to(torch.bfloat16)


def _dense_loss(world: list[testing.RankInputs], xs, ws, gs, layout: str, local: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The same function on one process: per token, sum over destination ranks (and, in
    expert_major, over the token's experts there) of the expert rows, dotted with g."""
    total = torch.zeros((), dtype=torch.float32)
    for src, inp in enumerate(world):
        for b in range(inp.x.shape[0]):
            chosen = [int(e) for e in inp.topk_idx[b] if int(e) >= 0]
            out_b = torch.zeros(HIDDEN, dtype=torch.float32)
            for d in sorted({e // local for e in chosen}):
                on_d = [
                    k
                    for k in range(inp.topk_idx.shape[1])
                    if int(inp.topk_idx[b, k]) // local == d and int(inp.topk_idx[b, k]) >= 0
                ]
                w_sum = sum(ws[src][b, k] for k in on_d)
                row = (xs[src][b].float() * (0.5 + d) + w_sum).to(torch.bfloat16).float()
                copies = 1 if layout == "flat" else len(on_d)
                out_b = out_b + copies * row
            total = total + (out_b.to(torch.bfloat16).float() * gs[src][b]).sum()
    return total


def _gradients(layout: str, seed: int) -> list[float]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(seed * 17 + rank)
    errors = []
    with ncclep.Group(EXPERTS, T, HIDDEN, mode="ht") as group:
        for call, tokens in enumerate((T, 0 if rank == 1 else 5, 9)):
            x = torch.randn(tokens, HIDDEN, generator=g).to(torch.bfloat16).requires_grad_()
            idx, w0 = make_routing("uniform", tokens, EXPERTS, 3, world_size=world_size, generator=g)
            if call % 2:
                idx = idx.to(torch.int32)
            w = w0.clone().requires_grad_()
            gout = torch.randn(tokens, HIDDEN, generator=g)
            align = 4 if layout == "expert_major" else 1
            out = group.ht_dispatch(x, idx, w, layout=layout, alignment=align)
            assert out.topk_idx.dtype == idx.dtype
            rows = _expert_rows(out.x, out.topk_weights, out.topk_idx, rank)
            y, _ = group.ht_combine(rows, out.handle)
            (y.float() * gout).sum().backward()

            world = testing.gather_inputs(None, x.detach(), idx, w0)
            gs = testing.gather_tensor(None, gout)
            xs = [inp.x.clone().requires_grad_() for inp in world]
            ws = [inp.topk_weights.clone().requires_grad_() for inp in world]
            _dense_loss(world, xs, ws, gs, layout, group.num_local_experts).backward()
            for got, want in ((x.grad, xs[rank].grad), (w.grad, ws[rank].grad)):
                if tokens and want is not None and got is not None:
                    err = float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))
                    errors.append(err)
    return errors


@pytest.mark.parametrize("layout", ["flat", "expert_major"])
def test_gradients_match_dense(world3, layout: str) -> None:  # type: ignore[no-untyped-def]
    for errors in world3.run(_gradients, layout, 1):
        assert errors and max(errors) < 2e-2, errors


def _combine_weights_backward() -> bool:
    """ht_combine's weight output: its gradient routes back to the rows' local entries only."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(rank)
    with ncclep.Group(8, 6, 32, mode="ht") as group:
        x = torch.randn(6, 32, generator=g).to(torch.bfloat16)
        idx, w = make_routing("uniform", 6, 8, 2, world_size=world_size, generator=g)
        out = group.ht_dispatch(x, idx.to(torch.int32), w)  # int32 received ids in the combine
        rows_w = out.topk_weights.clone().requires_grad_()
        _, combined = group.ht_combine(out.x, out.handle, topk_weights=rows_w)
        assert torch.equal(combined, w)
        combined.sum().backward()
        expected = (out.topk_idx >= 0).float()
        return bool(torch.equal(rows_w.grad, expected))


def test_combined_weights_gradient(world2) -> None:  # type: ignore[no-untyped-def]
    assert all(world2.run(_combine_weights_backward))
