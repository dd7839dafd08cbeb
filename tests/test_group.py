"""Group construction and properties: topology, virtual nodes, backends, closing, mpi4py-like comms."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_pool import DistPool
from helpers import generator, random_x, rank_and_world, routing
from test_ll import check_ll_combine, check_ll_dispatch, synthetic_expert_out

import ncclep
from ncclep import testing

H, T = 256, 8


def expect(exc: type[BaseException], pattern: str, fn: Any) -> None:
    with pytest.raises(exc, match=pattern):
        fn()


def _properties_worker() -> dict[str, Any]:
    rank, world = rank_and_world()
    experts = 4 * world
    with ncclep.Group(experts, T, H, mode="ll") as group:  # backend "auto": the reference on CPU
        assert ncclep.get_group(group.id) is group and not group.closed
        props = dict(
            rank=group.rank,
            world_size=group.world_size,
            num_local_experts=group.num_local_experts,
            num_experts=group.num_experts,
            max_tokens_per_rank=group.max_tokens_per_rank,
            hidden=group.hidden,
            mode=group.mode,
            ranks_per_node=group.ranks_per_node,
            num_nodes=group.num_nodes,
            buffer_bytes=group.buffer_bytes,
            backend=group.backend,
            backend_reason=group.backend_reason,
            native_info=group.native_info,
            device=str(group.device),
        )
        assert group.process_group is dist.group.WORLD
        assert f"rank={rank}/{world}" in repr(group) and "backend='reference'" in repr(group)
        expect(ncclep.NcclepError, "needs the CUDA extension", group.check_lsa)
    assert group.closed, "leaving the with-block closes the group"
    expect(ncclep.NcclepError, "no open ncclep group", lambda: ncclep.get_group(group.id))
    with ncclep.Group(experts, T, H, mode="ht", backend="reference", max_topk=4) as ht:
        assert ht.mode == "ht" and ht.backend == "reference" and ht.buffer_bytes == 0
        assert ht.config.max_topk == 4
    # the CUDA backend cannot be had on a CPU group, and unknown backends are refused
    expect(
        ncclep.NcclepError,
        r"backend='cuda' is not available",
        lambda: ncclep.Group(experts, T, H, backend="cuda"),
    )
    expect(
        ncclep.InvalidArgument, r"backend must be one of", lambda: ncclep.Group(experts, T, H, backend="gpu")
    )
    # sizes are checked before any communication
    expect(ValueError, r"num_experts \(\d+\) must be divisible by the world size",
           lambda: ncclep.Group(experts + 1, T, H))  # fmt: skip
    expect(ValueError, r"mode must be one of", lambda: ncclep.Group(experts, T, H, mode="xl"))
    expect(
        ValueError, r"LL mode needs hidden divisible by 128, got 200", lambda: ncclep.Group(experts, T, 200)
    )
    expect(
        ValueError, r"HT mode needs hidden divisible by 8", lambda: ncclep.Group(experts, T, 100, mode="ht")
    )
    expect(
        ValueError,
        rf"max_topk \(33\) must be at most num_experts \({experts}\)",
        lambda: ncclep.Group(experts, T, H, max_topk=33),
    )
    expect(ValueError, r"timeout_s must be positive", lambda: ncclep.Group(experts, T, H, timeout_s=0))
    # every constructor error is an InvalidArgument, so `except ncclep.NcclepError` catches it too
    for bad in (
        dict(mode="xl"),
        dict(max_topk=0),
        dict(num_sms=-1),
        dict(num_sms=True),
        dict(backend="gpu"),
        dict(timeout_s=float("inf")),
        dict(timeout_s=float("nan")),
        dict(timeout_s=True),
        dict(process_group="world"),
    ):
        expect(ncclep.InvalidArgument, "", lambda bad=bad: ncclep.Group(experts, T, H, **bad))
        expect(ncclep.NcclepError, "", lambda bad=bad: ncclep.Group(experts, T, H, **bad))
    # a rank outside the process group cannot make a group over it
    only_rank0 = dist.new_group([0])
    if rank != 0:
        expect(
            ncclep.InvalidArgument, "not a member", lambda: ncclep.Group(4, T, H, process_group=only_rank0)
        )
    return props


@pytest.mark.parametrize("world_name", ["world2", "world3", "world4"])
def test_group_properties(world_name: str, request: pytest.FixtureRequest) -> None:
    pool: DistPool = request.getfixturevalue(world_name)
    world = pool.world_size
    for rank, props in enumerate(pool.run(_properties_worker)):
        assert props == dict(
            rank=rank,
            world_size=world,
            num_local_experts=4,
            num_experts=4 * world,
            max_tokens_per_rank=T,
            hidden=H,
            mode="ll",
            ranks_per_node=world,  # every rank of the pool is on this host
            num_nodes=1,
            buffer_bytes=0,
            backend="reference",
            backend_reason="the group is not on CUDA devices (its process group is not NCCL)",
            native_info={},
            device="cpu",
        )


def _group_ids_worker() -> None:
    a = ncclep.Group(16, T, H, max_topk=8, backend="reference")
    b = ncclep.Group(16, T, H, max_topk=4, backend="reference")
    c = ncclep.Group(16, T, H, max_topk=8, backend="reference")
    try:
        assert len({a.id, b.id, c.id}) == 3, "open groups need distinct ids"
        # Compiled graphs carry the id as a constant and torch.compile's on-disk caches are keyed on
        # the graph: groups of different sizes must never share an id across processes either, so
        # the sizes are part of the id (above the low 20 bits of the per-process counter).
        assert a.id >> 20 == c.id >> 20 and a.id >> 20 != b.id >> 20
        for g in (a, b, c):
            assert ncclep.get_group(g.id) is g
            assert 0 < g.id < 2**63
    finally:
        for g in (a, b, c):
            g.close()


def test_group_ids(world2: DistPool) -> None:
    world2.run(_group_ids_worker)


def _virtual_nodes_worker() -> list[tuple[str, int, int]]:
    rank, world = rank_and_world()
    seen = []
    try:
        for nodes in ("2", "4", "1"):
            os.environ["NCCLEP_VIRTUAL_NODES"] = nodes
            with ncclep.Group(4 * world, T, H, mode="ll", backend="reference") as group:
                seen.append((nodes, group.ranks_per_node, group.num_nodes))
                # the reference backend ignores the topology, but the group must still work
                g = generator(int(nodes))
                x = random_x(T - rank, H, g)
                idx, w = routing("random", T - rank, 4 * world, 4, g, masked=3)
                out, inputs = check_ll_dispatch(group, x, idx, w, False, False, f"virtual nodes {nodes}")
                check_ll_combine(
                    group, synthetic_expert_out(group, out), out.handle, inputs, False, False, ""
                )
        for bad, pattern in (
            ("3", r"NCCLEP_VIRTUAL_NODES=3 does not divide the 4 ranks of a host"),
            ("0", r"NCCLEP_VIRTUAL_NODES must be at least 1, got 0"),
            ("two", r"NCCLEP_VIRTUAL_NODES must be an integer, got 'two'"),
        ):
            os.environ["NCCLEP_VIRTUAL_NODES"] = bad
            expect(ncclep.InvalidArgument, pattern, lambda: ncclep.Group(4 * world, T, H))
    finally:
        os.environ.pop("NCCLEP_VIRTUAL_NODES", None)
    return seen


def test_virtual_nodes(world4: DistPool) -> None:
    for seen in world4.run(_virtual_nodes_worker):
        assert seen == [("2", 2, 2), ("4", 1, 4), ("1", 4, 1)]


class TorchComm:
    """Just enough of an mpi4py communicator, over torch.distributed's object collectives."""

    def __init__(self, reverse: bool = False) -> None:
        self.reverse = reverse  # a communicator whose rank order is not torch.distributed's

    def Get_rank(self) -> int:
        rank, world = rank_and_world()
        return world - 1 - rank if self.reverse else rank

    def Get_size(self) -> int:
        return dist.get_world_size()

    def bcast(self, obj: Any, root: int = 0) -> Any:
        box = [obj]
        src = dist.get_world_size() - 1 - root if self.reverse else root
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def allgather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out[::-1] if self.reverse else out


def _mpi_comm_worker() -> bool:
    rank, world = rank_and_world()
    with ncclep.Group(4 * world, T, H, mode="ll", process_group=TorchComm(), backend="reference") as group:
        assert group.process_group is dist.group.WORLD
        assert (group.rank, group.world_size) == (rank, world)
        g = generator(3)
        x = random_x(T, H, g)
        idx, w = routing("skewed", T, 4 * world, 4, g, masked=2)
        out, inputs = check_ll_dispatch(group, x, idx, w, True, False, "mpi comm")
        check_ll_combine(group, synthetic_expert_out(group, out), out.handle, inputs, True, False, "mpi comm")
    with ncclep.Group(4 * world, T, H, mode="ht", process_group=TorchComm(), backend="reference") as ht:
        res = ht.ht_dispatch(x, idx, w, layout="expert_major", alignment=8)
        y, back = ht.ht_combine(res.x, res.handle, topk_weights=res.topk_weights)
        assert y.shape == x.shape and back is not None
    expect(
        ncclep.InvalidArgument,
        r"does not span torch.distributed's world in rank order",
        lambda: ncclep.Group(4 * world, T, H, process_group=TorchComm(reverse=True)),
    )
    return True


def test_mpi4py_like_communicator(world2: DistPool) -> None:
    assert world2.run(_mpi_comm_worker) == [True, True]


def _subgroup_worker() -> list[float]:
    """Two independent groups over halves of the world: identity experts give back x * sum(w)."""
    rank, world = rank_and_world()
    half = world // 2
    subgroups = [dist.new_group(list(range(half))), dist.new_group(list(range(half, world)))]
    mine = subgroups[rank // half]
    errors = []
    with ncclep.Group(4 * half, T, H, mode="ll", process_group=mine, backend="reference") as group:
        assert (group.rank, group.world_size) == (rank % half, half)
        g = generator(4)
        x = random_x(T, H, g)
        idx, w = routing("random", T, 4 * half, 3, g, masked=4)
        out = group.ll_dispatch(x, idx, w)
        y = group.ll_combine(out.x, out.handle)
        ref = x.float() * torch.where(idx >= 0, w, 0.0).sum(1, keepdim=True)
        errors.append(float((y.float() - ref).norm() / ref.norm()))
        inputs = testing.gather_inputs(mine, x, idx, w)
        expected = testing.ll_dispatch_expected(group.config, group.rank, inputs, False, False)
        assert out.expert_counts.tolist() == [len(e) for e in expected]
    for sub in subgroups:
        dist.destroy_process_group(sub)
    return errors


def test_group_over_subgroups(world4: DistPool) -> None:
    for errors in world4.run(_subgroup_worker):
        assert all(e < 1e-2 for e in errors), errors
