"""The ncclep groups behind one Buffer: made on first use, sized from the calls.

* LL: one group per (device, experts, tokens per rank, hidden, top-k) of the calls. All of these
  are arguments or shapes that every rank passes alike, so every rank makes the same group at the
  same call. The Buffer checks the group's bytes against ``num_rdma_bytes`` first.
* HT: one group per (device, experts), grown when a call needs more tokens per rank, hidden or
  top-k than it has: the new group gets the next power of two of tokens (at least
  ``MIN_HT_TOKENS``), so a workload that creeps up grows it a few times only. Groups it replaces
  stay open until :meth:`Groups.close` (handles of their dispatches still combine on them).

Groups run over the Buffer's process group when its backend suits the tensors' device (NCCL for
CUDA tensors; gloo for CPU tensors); otherwise over a group of the same ranks with the right
backend, made once (``use_local_synchronization``: only the Buffer's ranks take part). DeepEP
users such as vLLM pass a gloo group and CUDA tensors: DeepEP only uses the group to exchange
handles, ncclep moves the tokens over NCCL.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch
import torch.distributed as dist

from ..errors import NcclepError
from ..group import Group

BACKEND_ENV = "NCCLEP_DEEP_EP_BACKEND"  # auto (default), cuda or reference
MIN_HT_TOKENS = 128
MIN_HT_TOPK = 8


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _suits(process_group: Any, device: torch.device) -> bool:
    backend = str(dist.get_backend(process_group))
    on_cuda = "nccl" in backend and torch.cuda.is_available()
    return on_cuda == (device.type == "cuda")


class Groups:
    """The LL and HT groups of one Buffer, over ``process_group``.

    Arguments:
        process_group: the Buffer's torch.distributed group.
        backend: ncclep's backend choice for every group (``"auto"``, ``"cuda"``, ``"reference"``);
            None: ``$NCCLEP_DEEP_EP_BACKEND``, else ``"auto"``.
        ht_max_tokens_per_rank: tokens per rank of the first HT group (None: from the first call).
    """

    def __init__(self, process_group: Any, backend: str | None, ht_max_tokens_per_rank: int | None) -> None:
        self.process_group = process_group
        self.backend = backend or os.environ.get(BACKEND_ENV, "auto")
        self.ht_max_tokens_per_rank = ht_max_tokens_per_rank
        self._per_device: dict[str, Any] = {}
        self._ll: dict[tuple[Any, ...], Group] = {}
        self._ht: dict[tuple[bool, int], tuple[Group, int, int, int]] = {}
        """Per (on CUDA, experts): the HT group and what it takes (tokens per rank, hidden, top-k),
        kept as ints so that a call checks its sizes without the group's properties."""
        self._retired: list[Group] = []
        self._lock = threading.Lock()
        self.closed = False

    def process_group_for(self, device: torch.device) -> Any:
        """The process group whose backend moves tensors on ``device`` (made once if needed)."""
        key = device.type
        if key not in self._per_device:
            if _suits(self.process_group, device):
                self._per_device[key] = self.process_group
            else:
                ranks = dist.get_process_group_ranks(self.process_group)
                backend = "nccl" if device.type == "cuda" else "gloo"
                self._per_device[key] = dist.new_group(ranks, backend=backend, use_local_synchronization=True)
        return self._per_device[key]

    def _make(self, device: torch.device, **sizes: Any) -> Group:
        if self.closed:
            raise NcclepError("the Buffer was destroyed")
        return Group(process_group=self.process_group_for(device), backend=self.backend, **sizes)

    def ll_group(
        self, device: torch.device, num_experts: int, max_tokens: int, hidden: int, topk: int
    ) -> Group:
        """The LL group for calls of these sizes (made by this call on every rank if it is the first)."""
        key = (device.type, num_experts, max_tokens, hidden, topk)
        group = self._ll.get(key)
        if group is not None:
            return group
        with self._lock:
            group = self._ll.get(key)
            if group is None:
                group = self._make(
                    device,
                    num_experts=num_experts,
                    max_tokens_per_rank=max_tokens,
                    hidden=hidden,
                    mode="ll",
                    max_topk=topk,
                )
                self._ll[key] = group
            return group

    def ht_group(
        self, like: torch.Tensor, num_experts: int, tokens: int, hidden: int, topk: int, num_sms: int | None
    ) -> Group:
        """An HT group for tensors on ``like``'s device that takes ``tokens`` per rank of ``hidden``
        with ``topk`` choices.

        Every rank must pass the same sizes (the Buffer agrees on ``tokens`` first). ``num_sms``
        applies when a group is made.
        """
        held = self._ht.get((like.is_cuda, num_experts))
        if held is not None and tokens <= held[1] and hidden <= held[2] and topk <= held[3]:
            return held[0]
        return self._grow_ht(like.device, num_experts, tokens, hidden, topk, num_sms)

    def _grow_ht(
        self, device: torch.device, num_experts: int, tokens: int, hidden: int, topk: int, num_sms: int | None
    ) -> Group:
        """:meth:`ht_group` when the group of ``device`` and ``num_experts`` is missing or too small
        (made, or replaced by a larger one, on every rank at this call)."""
        key = (device.type == "cuda", num_experts)
        with self._lock:
            held = self._ht.get(key)
            if held is not None and tokens <= held[1] and hidden <= held[2] and topk <= held[3]:
                return held[0]
            group = None if held is None else held[0]
            if group is None:
                want = self.ht_max_tokens_per_rank or 0
                max_tokens = want if want >= tokens else _next_power_of_two(max(tokens, MIN_HT_TOKENS))
                max_topk = min(max(topk, MIN_HT_TOPK), num_experts)
            else:
                max_tokens = max(group.max_tokens_per_rank, _next_power_of_two(max(tokens, MIN_HT_TOKENS)))
                hidden = max(hidden, group.hidden)
                max_topk = min(max(topk, group.config.max_topk), num_experts)
            new = self._make(
                device,
                num_experts=num_experts,
                max_tokens_per_rank=max_tokens,
                hidden=hidden,
                mode="ht",
                max_topk=max_topk,
                num_sms=num_sms or None,
            )
            if group is not None:
                self._retired.append(group)
            self._ht[key] = (new, new.max_tokens_per_rank, new.hidden, new.config.max_topk)
            return new

    def all_groups(self) -> list[Group]:
        return [*self._ll.values(), *(held[0] for held in self._ht.values()), *self._retired]

    def close(self) -> None:
        """Close every group (a collective, like making them)."""
        with self._lock:
            for group in self.all_groups():
                group.close()
            self._ll.clear()
            self._ht.clear()
            self._retired.clear()
            self.closed = True
