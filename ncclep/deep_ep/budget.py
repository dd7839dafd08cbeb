"""Device bytes of an LL group, and the byte hint DeepEP callers size their Buffer with.

An LL Buffer call needs an ncclep LL group for its sizes (tokens per rank, hidden, experts, top-k);
the group's symmetric window must fit in the Buffer's ``num_rdma_bytes``, as DeepEP's LL buffers
must. The window's size is the C library's (``ncclepComputeWindowBytes``) where the CUDA
extension is built; a pure-Python install follows the same plan here (the reference backend holds
no window, so there the figure only keeps the contract the same everywhere).
"""

from __future__ import annotations

from .. import _native
from ..config import LL_HIDDEN_MULTIPLE, MODE_IDS

DEFAULT_LL_MAX_TOPK = 16  # the LL kernels' largest top-k, when the extension cannot say
CONTROL_BYTES = 64 << 10  # csrc/core/buffer_plan.h kControlBytes
WINDOW_GRANULARITY = 2 << 20  # csrc/core/buffer_plan.h kWindowGranularity
REGION_ALIGN = 256
# sizeof(LLState): uint64 calls[4][kLLMaxBlocks], uint32 blocksDone[4] and aborted, padding to 8 bytes
LL_STATE_BYTES = 8 * 4 * 1024 + 4 * 4 + 4 + 4
LL_SIGNAL_KINDS = 8
LL_MARKS = 2 * 4  # received-data marks per peer: 2 ops x kLLMarkSlots


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def ll_max_topk(num_experts: int) -> int:
    """The largest top-k an LL group can take: the kernels' limit, at most the experts."""
    return min(int(_native.limits().get("ll_max_topk", DEFAULT_LL_MAX_TOPK)), num_experts)


def _ll_plan_bytes(num_experts: int, max_tokens: int, hidden: int, max_topk: int, world_size: int) -> int:
    """The LL buffer plan of csrc/kernels/ll/ll_layout.h (planLLLayout), in Python."""
    local_experts = num_experts // world_size
    header = _align(4 + 12 * max_topk, 16)
    payload = _align(2 * hidden, 16)
    dispatch_msg, combine_msg = header + payload, payload
    counts = _align((local_experts + 1) * 4, 16)
    weights = _align(4 * max_topk, 16)
    per_parity = 2 * world_size
    slots = per_parity * max_tokens
    messages = [
        per_parity * counts,
        slots * dispatch_msg,
        slots * combine_msg,
        per_parity * 16,
        slots * weights,
    ]
    control = [LL_STATE_BYTES, LL_SIGNAL_KINDS * world_size * 8, LL_MARKS * world_size * 8]
    regions = [*control, *messages, *messages]
    end = _align(CONTROL_BYTES, REGION_ALIGN)
    for size in regions:
        end = _align(end + size, REGION_ALIGN)
    return _align(end, WINDOW_GRANULARITY)


def ll_group_bytes(num_experts: int, max_tokens: int, hidden: int, max_topk: int, world_size: int) -> int:
    """Bytes of the symmetric window of an LL group of these sizes on every rank."""
    hidden = _align(hidden, LL_HIDDEN_MULTIPLE)
    if _native.available():
        c = _native.module()
        return int(c.window_bytes(MODE_IDS["ll"], num_experts, max_tokens, hidden, max_topk, world_size))
    return _ll_plan_bytes(num_experts, max_tokens, hidden, max_topk, world_size)


def low_latency_rdma_size_hint(max_tokens: int, hidden: int, world_size: int, num_experts: int) -> int:
    """``num_rdma_bytes`` that let LL calls of these sizes run with any top-k the kernels take."""
    return ll_group_bytes(num_experts, max_tokens, hidden, ll_max_topk(num_experts), world_size)
