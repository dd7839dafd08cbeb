"""GPU: an eager dispatch's small outputs (counts, ids, weights, the handle: all but ``x`` and its
scales) are views of one allocation per dtype, aligned and apart; the custom op's outputs (what
torch.compile, autograd and modes get) each have their own, as torch requires of an op. The values
are the same either way, a combine takes either handle, and torch.save writes them."""

from __future__ import annotations

import io
import itertools
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import gpu_pool
from helpers import bits
from torch.overrides import TorchFunctionMode

import ncclep
from ncclep import fp8, ops
from ncclep.workloads import make_routing

pytestmark = pytest.mark.gpu

EXPERTS, TOKENS, HIDDEN, TOPK = 32, 24, 512, 4
ALIGN = 256  # each view's first byte (csrc/python/output_plan.h)


class _PassThrough(TorchFunctionMode):
    """Changes nothing; while it is active the group's calls go through the custom ops."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes of its storage that ``t`` covers: [first, end)."""
    first = t.storage_offset() * t.element_size()
    if t.numel() == 0:
        return first, first
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
    return first, first + (last + 1) * t.element_size()


def _check_storage(eager: list[torch.Tensor], traced: list[torch.Tensor], payload: int) -> None:
    """``eager``/``traced``: the outputs, the first ``payload`` of them x and its scales."""
    small = eager[payload:]
    others = {_ptr(t) for t in small}
    for t in eager[:payload]:
        assert _ptr(t) not in others and t.storage_offset() == 0
    by_dtype: dict[torch.dtype, set[int]] = {}
    for t in small:
        by_dtype.setdefault(t.dtype, set()).add(_ptr(t))
    assert all(len(ptrs) == 1 for ptrs in by_dtype.values()), by_dtype
    assert len(by_dtype) < len(small)  # something was shared
    by_storage: dict[int, list[tuple[int, int]]] = {}
    for t in small:
        assert t.data_ptr() % ALIGN == 0
        by_storage.setdefault(_ptr(t), []).append(_span(t))
    for spans in by_storage.values():
        spans.sort()
        assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans)), spans
    ptrs = {id(t): _ptr(t) for t in traced if t.numel()}  # a handle may hold an output twice
    assert len(set(ptrs.values())) == len(ptrs)
    for a, b in zip(eager, traced, strict=True):
        assert (a.dtype, a.shape, a.stride()) == (b.dtype, b.shape, b.stride())
    buffer = io.BytesIO()
    torch.save(eager, buffer)  # one storage viewed as two dtypes would be refused
    buffer.seek(0)
    for a, b in zip(eager, torch.load(buffer), strict=True):
        assert (a.dtype, a.shape, a.stride()) == (b.dtype, b.shape, b.stride())
        assert torch.equal(bits(a).cpu(), bits(b).cpu())


def _ll_tensors(out: ncclep.LLDispatchOutput) -> list[torch.Tensor]:
    scales = [out.scales] if out.scales is not None else []
    return [out.x, *scales, out.expert_counts, *out.handle.tensors()]


def _ht_tensors(out: ncclep.HTDispatchOutput) -> list[torch.Tensor]:
    h = out.handle
    scales = [out.scales] if out.scales is not None else []
    weights = [out.topk_weights] if out.topk_weights is not None else []
    return [
        out.x,
        *scales,
        out.topk_idx,
        *weights,
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
    x = torch.randn(TOKENS, HIDDEN, generator=g).to(torch.bfloat16)
    idx, w = make_routing("random", TOKENS, EXPERTS, TOPK, world_size=world, generator=g, masked=5)
    x_fp8, x_scales = (t.to(dev) for t in fp8.quantize(x))
    x, idx, w = x.to(dev), idx.to(dev), w.to(dev)
    # (use_fp8, ue8m0, column_major_scales): bf16, fp8 and UE8M0 scales row-major and column-major
    formats = [
        (False, False, False),
        (True, False, False),
        (True, True, False),
        (True, False, True),
        (True, True, True),
    ]
    with ncclep.Group(EXPERTS, TOKENS, HIDDEN, mode="ll", max_topk=TOPK, backend="cuda") as ll:
        for tokens, (use_fp8, ue8m0, column_major) in [(TOKENS, f) for f in formats] + [(0, formats[1])]:
            args = (x[:tokens], idx[:tokens], w[:tokens], use_fp8, ue8m0)
            assert ops.eager(x)
            eager = ll.ll_dispatch(*args, column_major_scales=column_major)
            with _PassThrough():
                assert not ops.eager(x)
                traced = ll.ll_dispatch(*args, column_major_scales=column_major)
            _check_storage(_ll_tensors(eager), _ll_tensors(traced), 1 + use_fp8)
            assert torch.equal(eager.expert_counts, traced.expert_counts)
            for a, b in zip(eager.handle.tensors(), traced.handle.tensors(), strict=True):
                assert torch.equal(a, b)
            for e, n in enumerate(eager.expert_counts.tolist()):  # rows past the counts are padding
                assert torch.equal(bits(eager.x[e, :n]), bits(traced.x[e, :n]))
                if use_fp8:
                    assert torch.equal(bits(eager.scales[e, :n]), bits(traced.scales[e, :n]))
            y = torch.randn(eager.x.shape, generator=g).to(torch.bfloat16).to(dev)
            assert torch.equal(ll.ll_combine(y, eager.handle), ll.ll_combine(y, traced.handle))
    with ncclep.Group(EXPERTS, TOKENS, HIDDEN, mode="ht", max_topk=TOPK, backend="cuda") as ht:
        for payload, scales, ids in ((x, None, idx), (x, None, idx.to(torch.int32)), (x_fp8, x_scales, idx)):
            eager_ht = ht.ht_dispatch(payload, ids, w, scales)
            with _PassThrough():
                traced_ht = ht.ht_dispatch(payload, ids, w, scales)
            _check_storage(_ht_tensors(eager_ht), _ht_tensors(traced_ht), 1 + (scales is not None))
            n = int(eager_ht.num_recv.item())
            assert torch.equal(bits(eager_ht.x[:n]), bits(traced_ht.x[:n]))
            small = 1 + (scales is not None)
            for a, b in zip(_ht_tensors(eager_ht)[small:], _ht_tensors(traced_ht)[small:], strict=True):
                assert torch.equal(a, b)
            y = torch.randn(eager_ht.x.shape, generator=g).to(torch.bfloat16).to(dev)
            assert torch.equal(ht.ht_combine(y, eager_ht.handle)[0], ht.ht_combine(y, traced_ht.handle)[0])
    torch.cuda.synchronize()
    return True


@pytest.mark.parametrize("world", [1, 2])
def test_eager_outputs_share_one_allocation_per_dtype(world: int) -> None:
    assert gpu_pool(world).run(_outputs_share_per_dtype, 3) == [True] * world
