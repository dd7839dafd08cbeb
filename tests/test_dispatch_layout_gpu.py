"""GPU: ``ncclep._C.dispatch_layout`` (get_dispatch_layout's native op) against the torch version,
exactly: int64 and int32 ids with -1, out-of-range ids and repeats, several sizes; what the Buffer's
``dispatch_layout`` picks on CUDA; a CUDA graph replay; the argument errors. One GPU, no
communication.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from ncclep import _native
from ncclep.deep_ep import layout
from ncclep.deep_ep.layout import DispatchLayout, torch_dispatch_layout

pytestmark = pytest.mark.gpu

SIZES = [(256, 4, 1), (256, 8, 2), (64, 2, 1), (64, 64, 4), (30, 3, 3)]  # (experts, ranks, nodes)


def _native_op() -> Callable[..., Any]:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    op = getattr(_native._C, "dispatch_layout", None)
    if op is None:
        pytest.skip("needs the ncclep CUDA extension with dispatch_layout")
    return op


def _ids(tokens: int, topk: int, experts: int, dtype: torch.dtype, noisy: bool, seed: int) -> torch.Tensor:
    """Routed ids with about a fifth -1; ``noisy``: also ids outside [-1, E) and many repeats."""
    g = torch.Generator().manual_seed(seed)
    if noisy:
        ids = torch.randint(-4, experts + 4, (tokens, topk), generator=g)
        ids[torch.rand(tokens, topk, generator=g) < 0.05] = 2**40 if dtype == torch.int64 else 2**30
        ids[:, -1] = ids[:, 0]  # a repeat in every row with top-k > 1
    else:
        ids = torch.randint(0, experts, (tokens, topk), generator=g)
        ids[torch.rand(tokens, topk, generator=g) < 0.2] = -1
    return ids.to(dtype=dtype, device="cuda")


def _assert_equal(got: DispatchLayout, want: DispatchLayout) -> None:
    for name, g, w in zip(DispatchLayout._fields, got, want, strict=True):
        if w is None:
            assert g is None, name
            continue
        assert g is not None, name
        assert (g.dtype, tuple(g.shape), g.device) == (w.dtype, tuple(w.shape), w.device), name
        assert torch.equal(g, w), name


@pytest.mark.parametrize("experts,ranks,nodes", SIZES)
@pytest.mark.parametrize("tokens", [0, 1, 7, 4096])
@pytest.mark.parametrize("topk", [1, 8])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("noisy", [False, True], ids=["routed", "noisy"])
def test_native_layout_equals_torch(
    experts: int, ranks: int, nodes: int, tokens: int, topk: int, dtype: torch.dtype, noisy: bool
) -> None:
    op = _native_op()
    idx = _ids(tokens, topk, experts, dtype, noisy, seed=tokens * 31 + topk)
    got = DispatchLayout(*op(idx, experts, ranks, nodes))
    _assert_equal(got, torch_dispatch_layout(idx, experts, ranks, nodes))


def test_non_contiguous_ids_and_many_blocks() -> None:
    op = _native_op()
    wide = _ids(300_000, 16, 128, torch.int64, noisy=False, seed=5)
    idx = wide[:, ::2]  # [B, 8] with a row stride of 16
    assert not idx.is_contiguous()
    _assert_equal(DispatchLayout(*op(idx, 128, 16, 2)), torch_dispatch_layout(idx, 128, 16, 2))


def test_buffer_layout_takes_the_native_op_on_cuda() -> None:
    _native_op()
    idx = _ids(64, 8, 256, torch.int64, noisy=False, seed=7)
    got = layout.dispatch_layout(idx, 256, 8, 2)
    # the native op's three counts are views of one tensor
    assert got.num_tokens_per_rdma_rank is not None
    storage = got.num_tokens_per_rank.untyped_storage().data_ptr()
    assert got.num_tokens_per_expert.untyped_storage().data_ptr() == storage
    assert got.num_tokens_per_rdma_rank.untyped_storage().data_ptr() == storage
    _assert_equal(got, torch_dispatch_layout(idx, 256, 8, 2))
    # past the kernel's ranks: the torch version, same results
    wide = _ids(64, 8, 256, torch.int64, noisy=False, seed=8)
    _assert_equal(layout.dispatch_layout(wide, 256, 128, 1), torch_dispatch_layout(wide, 256, 128, 1))


def test_native_layout_in_a_cuda_graph() -> None:
    op = _native_op()
    idx = _ids(1024, 8, 256, torch.int64, noisy=False, seed=9)
    op(idx, 256, 8, 2)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = DispatchLayout(*op(idx, 256, 8, 2))
    idx.copy_(_ids(1024, 8, 256, torch.int64, noisy=True, seed=10))
    graph.replay()
    torch.cuda.synchronize()
    _assert_equal(captured, torch_dispatch_layout(idx, 256, 8, 2))


def test_native_layout_argument_errors() -> None:
    op = _native_op()
    idx = _ids(4, 2, 16, torch.int64, noisy=False, seed=11)
    with pytest.raises(ValueError, match="CUDA tensor"):
        op(idx.cpu(), 16, 4, 1)
    with pytest.raises(ValueError, match="num_tokens, num_topk"):
        op(idx.view(2, 2, 2), 16, 4, 1)
    with pytest.raises(TypeError, match="int64 or int32"):
        op(idx.to(torch.int16), 16, 4, 1)
    with pytest.raises(ValueError, match="world_size"):
        op(idx, 256, 128, 1)
    with pytest.raises(ValueError, match="multiple of world_size"):
        op(idx, 18, 4, 1)
    with pytest.raises(ValueError, match="num_nodes"):
        op(idx, 16, 4, 3)
