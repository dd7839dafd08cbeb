"""GPU: ncclep.Group over NCCL, its Device API bring-up, and the reference backend on CUDA tensors."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from conftest import gpu_pool

import ncclep
from ncclep import testing
from ncclep.workloads import make_routing

pytestmark = pytest.mark.gpu


def _bringup(virtual_nodes: int) -> dict[str, object]:
    if virtual_nodes > 1:
        os.environ["NCCLEP_VIRTUAL_NODES"] = str(virtual_nodes)
    try:
        with ncclep.Group(256, 128, 7168, mode="ll") as group:
            info = group.native_info
            checks = [group.check_lsa() for _ in range(3)]
            return {
                "device_api": info["device_api"],
                "lsa_size": info["lsa_size"],
                "lsa_rank": info["lsa_rank"],
                "n_lsa_teams": info["n_lsa_teams"],
                "window_bytes": info["window_bytes"],
                "checks": checks,
                "ranks_per_node": group.ranks_per_node,
                "num_nodes": group.num_nodes,
                "rank": group.rank,
            }
    finally:
        os.environ.pop("NCCLEP_VIRTUAL_NODES", None)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_group_brings_up_device_api(world: int) -> None:
    results = gpu_pool(world).run(_bringup, 1)
    for r in results:
        assert r["device_api"] is True
        assert r["lsa_size"] == world and r["n_lsa_teams"] == 1
        assert r["lsa_rank"] == r["rank"]
        assert r["checks"] == [True, True, True]
        assert r["window_bytes"] > 0
        assert (r["ranks_per_node"], r["num_nodes"]) == (world, 1)


def test_virtual_nodes_split_the_host() -> None:
    results = gpu_pool(4).run(_bringup, 2)
    for r in results:
        assert r["checks"] == [True, True, True]
        assert (r["ranks_per_node"], r["num_nodes"]) == (2, 2)


def _reference_on_gpu(seed: int) -> list[float]:
    rank = dist.get_rank()
    world = dist.get_world_size()
    g = torch.Generator().manual_seed(seed * 100 + rank)
    dev = torch.device("cuda", torch.cuda.current_device())
    errors = []
    with ncclep.Group(32, 24, 512, mode="ll", backend="reference") as group:
        cfg = group.config
        for tokens, routing in ((24, "random"), (0 if rank == 1 else 7, "skewed"), (16, "hot")):
            x = torch.randn(tokens, 512, generator=g).to(torch.bfloat16)
            idx, w = make_routing(routing, tokens, 32, 4, world_size=world, generator=g, masked=3)
            out = group.ll_dispatch(x.to(dev), idx.to(dev), w.to(dev))
            inputs = testing.gather_inputs(None, x, idx, w)
            expected = testing.ll_dispatch_expected(cfg, rank, inputs, False, False)
            assert out.expert_counts.cpu().tolist() == [len(rows) for rows in expected]
            for e, rows in enumerate(expected):
                for p, row in enumerate(rows):
                    assert torch.equal(out.x[e, p].cpu(), row.payload)

            def fn(expert: int, rows: torch.Tensor) -> torch.Tensor:
                return (rows.float() * (expert + 1) / 32).to(torch.bfloat16)

            local = [fn(rank * cfg.num_local_experts + e, out.x[e]) for e in range(cfg.num_local_experts)]
            y = group.ll_combine(torch.stack(local), out.handle)
            ref = testing.ll_combine_expected(cfg, rank, inputs, fn)
            errors.append(float((y.float().cpu() - ref).norm() / ref.norm().clamp_min(1e-30)))
    with ncclep.Group(32, 64, 256, mode="ht", backend="reference") as group:
        cfg = group.config
        x = torch.randn(64, 256, generator=g).to(torch.bfloat16)
        idx, w = make_routing("uniform", 64, 32, 8, world_size=world, generator=g)
        out = group.ht_dispatch(x.to(dev), idx.to(dev), w.to(dev), layout="expert_major", alignment=16)
        inputs = testing.gather_inputs(None, x, idx, w)
        rows, counts = testing.ht_dispatch_expected(cfg, rank, inputs, "expert_major", 16)
        assert out.expert_counts.cpu().tolist() == counts and int(out.num_recv) == len(rows)
        for n, row in enumerate(rows):
            if row is not None:
                assert torch.equal(out.x[n].cpu(), inputs[row.src].x[row.token])
        y, _ = group.ht_combine(out.x, out.handle)
        ref = testing.ht_combine_expected(cfg, rank, inputs, "expert_major", lambda d, e, xr: xr)
        errors.append(float((y.float().cpu() - ref).norm() / ref.norm().clamp_min(1e-30)))
    return errors


@pytest.mark.parametrize("world", [2, 4, 8])
def test_reference_backend_on_gpu_matches_oracle(world: int) -> None:
    for errors in gpu_pool(world).run(_reference_on_gpu, world):
        assert max(errors) < 1e-2, errors
