"""GPU: an eager dispatch's outputs after ``x`` are views of one allocation per dtype; the custom
op's outputs (what torch.compile, autograd and modes get) each have their own, as torch requires of
an op. The values are the same either way, a combine takes either handle, and torch.save writes
them."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import gpu_pool
from torch.overrides import TorchFunctionMode

import ncclep
from ncclep import ops
from ncclep.workloads import make_routing

pytestmark = pytest.mark.gpu

EXPERTS, TOKENS, HIDDEN, TOPK = 32, 24, 512, 4


class _PassThrough(TorchFunctionMode):
    """Changes nothing; while it is active the group's calls go through the custom ops."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _check_storage(eager: list[torch.Tensor], traced: list[torch.Tensor]) -> None:
    """``eager``/``traced``: x, then the other outputs (handle tensors included)."""
    by_dtype: dict[torch.dtype, set[int]] = {}
    for t in eager[1:]:
        by_dtype.setdefault(t.dtype, set()).add(_ptr(t))
    assert all(len(ptrs) == 1 for ptrs in by_dtype.values()), by_dtype
    assert len(by_dtype) < len(eager) - 1  # something was shared
    assert _ptr(eager[0]) not in {_ptr(t) for t in eager[1:]}
    ptrs = {id(t): _ptr(t) for t in traced if t.numel()}  # a handle may hold an output twice
    assert len(set(ptrs.values())) == len(ptrs)
    for a, b in zip(eager, traced, strict=True):
        assert (a.dtype, a.shape, a.stride()) == (b.dtype, b.shape, b.stride())
    buffer = io.BytesIO()
    torch.save(eager, buffer)
    buffer.seek(0)
    for a, b in zip(eager, torch.load(buffer), strict=True):  # tensors of one storage, mixed dtypes refused
        assert (a.dtype, a.shape, a.stride()) == (b.dtype, b.shape, b.stride())
        assert a.is_floating_point() or torch.equal(a, b)  # floats: padding may hold NaN bit patterns


def _ll_tensors(out: ncclep.LLDispatchOutput) -> list[torch.Tensor]:
    rest = [out.scales] if out.scales is not None else []
    return [out.x, *rest, out.expert_counts, *out.handle.tensors()]


def _ht_tensors(out: ncclep.HTDispatchOutput) -> list[torch.Tensor]:
    h = out.handle
    optional = [t for t in (out.scales, out.topk_weights) if t is not None]
    return [
        out.x,
        *optional,
        out.topk_idx,
        out.num_recv,
        out.expert_counts,
        h.send_pos,
        h.recv_slot,
        h.recv_counts,
    ]


def _outputs_share_per_dtype(seed: int) -> bool:
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(seed * 10 + rank)
    dev = torch.device("cuda", torch.cuda.current_device())
    x = torch.randn(TOKENS, HIDDEN, generator=g).to(torch.bfloat16).to(dev)
    idx, w = make_routing("random", TOKENS, EXPERTS, TOPK, world_size=world, generator=g, masked=5)
    idx, w = idx.to(dev), w.to(dev)
    with ncclep.Group(EXPERTS, TOKENS, HIDDEN, mode="ll", max_topk=TOPK, backend="cuda") as ll:
        for use_fp8, ue8m0, column_major in ((False, False, False), (True, False, True), (True, True, True)):
            assert ops.eager(x)
            eager = ll.ll_dispatch(x, idx, w, use_fp8, ue8m0, column_major_scales=column_major)
            with _PassThrough():
                assert not ops.eager(x)
                traced = ll.ll_dispatch(x, idx, w, use_fp8, ue8m0, column_major_scales=column_major)
            _check_storage(_ll_tensors(eager), _ll_tensors(traced))
            assert torch.equal(eager.expert_counts, traced.expert_counts)
            for a, b in zip(eager.handle.tensors(), traced.handle.tensors(), strict=True):
                assert torch.equal(a, b)
            for e, n in enumerate(eager.expert_counts.tolist()):  # rows past the counts are padding
                assert torch.equal(eager.x[e, :n].view(torch.uint8), traced.x[e, :n].view(torch.uint8))
                if use_fp8:
                    assert torch.equal(eager.scales[e, :n], traced.scales[e, :n])
            y = torch.randn(eager.x.shape, generator=g).to(torch.bfloat16).to(dev)
            assert torch.equal(ll.ll_combine(y, eager.handle), ll.ll_combine(y, traced.handle))
    with ncclep.Group(EXPERTS, TOKENS, HIDDEN, mode="ht", max_topk=TOPK, backend="cuda") as ht:
        for ids in (idx, idx.to(torch.int32)):
            eager_ht = ht.ht_dispatch(x, ids, w)
            with _PassThrough():
                traced_ht = ht.ht_dispatch(x, ids, w)
            _check_storage(_ht_tensors(eager_ht), _ht_tensors(traced_ht))
            n = int(eager_ht.num_recv.item())
            assert torch.equal(eager_ht.x[:n], traced_ht.x[:n])
            for a, b in zip(_ht_tensors(eager_ht)[1:], _ht_tensors(traced_ht)[1:], strict=True):
                assert torch.equal(a, b)
            y = torch.randn(eager_ht.x.shape, generator=g).to(torch.bfloat16).to(dev)
            assert torch.equal(ht.ht_combine(y, eager_ht.handle)[0], ht.ht_combine(y, traced_ht.handle)[0])
    torch.cuda.synchronize()
    return True


@pytest.mark.parametrize("world", [1, 2])
def test_eager_outputs_share_one_allocation_per_dtype(world: int) -> None:
    assert gpu_pool(world).run(_outputs_share_per_dtype, 3) == [True] * world
