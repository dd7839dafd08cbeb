"""``Buffer``: DeepEP V1's ``deep_ep.Buffer`` on ncclep groups.

Same constructor, methods, arguments, shapes, dtypes and layouts as DeepEP returns them; where the
meaning differs the docstring says so under "ncclep:" and ``docs/deep_ep.md`` lists every
difference. Arguments ncclep cannot honour raise :class:`ncclep.InvalidArgument` naming them.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..bootstrap import init_from_mpi, is_mpi_comm
from ..errors import InvalidArgument, NcclepError
from . import budget
from .config import Config
from .groups import Groups
from .handles import DispatchHandle, LowLatencyHandle
from .high_throughput import HighThroughput, Payload
from .low_latency import LowLatency
from .streams import StreamState
from .utils import EventHandle, EventOverlap


def _hosts(process_group: Any) -> list[str]:
    names: list[Any] = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(names, socket.gethostname(), group=process_group)
    return names


def _num_nodes(hosts: list[str]) -> int:
    """Nodes as consecutive, equal blocks of ranks on one host each; 1 if the ranks are laid out
    otherwise (then no per-node counts are given)."""
    nodes = len(dict.fromkeys(hosts))
    per_node = len(hosts) // nodes
    blocks = [hosts[i * per_node : (i + 1) * per_node] for i in range(nodes)]
    if per_node * nodes != len(hosts) or any(len(set(block)) != 1 for block in blocks):
        return 1
    return nodes


class Buffer:
    """Expert-parallel dispatch and combine for MoE models, DeepEP V1's API over ncclep:

    - high-throughput dispatch and combine (prefill, training): ncclep HT groups, NVLink within a
      node, the hierarchical path (GIN) across nodes;
    - low-latency dispatch and combine (decode): ncclep LL groups.

    The Buffer holds no device memory of its own. It makes ncclep groups over its process group
    on first use, sized from the calls: an LL group per (tokens per rank, hidden, experts, top-k),
    which must fit ``num_rdma_bytes``; an HT group per expert count, grown when a call passes more
    tokens per rank than it holds (see ``docs/deep_ep.md``). Every rank must make the same calls in
    the same order, as with DeepEP.

    Attributes:
        num_sms: the SMs of the HT kernels, used when an HT group is made.
        rank: the local rank number.
        group_size: the number of ranks in the group.
        group: the communication group.
        num_nvl_bytes: the byte size given for intranode HT buffers (ncclep: HT groups grow with
            the calls instead, see :meth:`dispatch`).
        num_rdma_bytes: the byte budget of the LL groups.
    """

    num_sms: int = 20

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        use_fabric: bool = False,
        explicitly_destroy: bool = False,
        enable_shrink: bool = False,
        comm: Any = None,
        *,
        backend: str | None = None,
        ht_max_tokens_per_rank: int | None = None,
    ) -> None:
        """
        Initialise the communication buffer (a collective over the group, like DeepEP's).

        Arguments:
            group: the communication group (any torch.distributed backend: the Buffer makes a
                group of the same ranks with the backend its tensors need, e.g. NCCL for CUDA
                tensors when it is given vLLM's gloo group).
            num_nvl_bytes: the buffer size for intranode communication (ncclep: recorded; HT
                groups are sized by the calls).
            num_rdma_bytes: the byte budget of the LL groups: an LL call whose group would need
                more raises :class:`ncclep.InvalidArgument` naming the size to pass
                (:meth:`get_low_latency_rdma_size_hint`).
            low_latency_mode: whether to enable low-latency mode (the LL calls require it).
            num_qps_per_rank: the number of RDMA QPs (ncclep: accepted, no effect: ncclep picks its
                transports per peer).
            allow_nvlink_for_low_latency_mode: (ncclep: accepted, no effect: peers on one node
                always use NVLink).
            allow_mnnvl: (ncclep: accepted, no effect).
            use_fabric: (ncclep: accepted, no effect).
            explicitly_destroy: if set, :meth:`destroy` must be called to release the groups;
                otherwise they stay open until the process ends (ncclep: releasing a group is a
                collective, which a destructor cannot promise, so nothing is released on garbage
                collection).
            enable_shrink: DeepEP's rank masking (ncclep: not supported, True raises).
            comm: an ``mpi4py.MPI.Comm`` to use in case the group parameter is absent.
            backend: (ncclep only) the backend of the groups, ``"auto"``, ``"cuda"`` or
                ``"reference"``; None: ``$NCCLEP_DEEP_EP_BACKEND``, else ``"auto"``.
            ht_max_tokens_per_rank: (ncclep only) the tokens per rank of the first HT group, to
                size it once up front instead of from the first call.
        """
        if enable_shrink:
            raise InvalidArgument("enable_shrink=True: ncclep has no rank masking (shrink mode)")
        if group is None:
            if comm is None:
                raise InvalidArgument("Either 'group' or 'comm' must be provided.")
            if not is_mpi_comm(comm):
                raise InvalidArgument(f"comm must be an mpi4py communicator, got {type(comm).__name__}")
            group = init_from_mpi(comm, "nccl" if torch.cuda.is_available() else "gloo")
        self.group = group
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        self.num_nvl_bytes = int(num_nvl_bytes)
        self.num_rdma_bytes = int(num_rdma_bytes)
        self.low_latency_mode = low_latency_mode
        self.num_qps_per_rank = num_qps_per_rank
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = False
        self.num_nodes = _num_nodes(_hosts(group))
        self._streams = StreamState()
        self._groups = Groups(group, backend, ht_max_tokens_per_rank)
        self._ll = LowLatency(
            self._groups, self._streams, self.num_rdma_bytes, self.group_size, low_latency_mode
        )
        self._ht = HighThroughput(self._groups, self._streams, self.rank, self.group_size, self.num_nodes)

    def __repr__(self) -> str:
        return (
            f"ncclep.deep_ep.Buffer(rank={self.rank}/{self.group_size}, "
            f"low_latency_mode={self.low_latency_mode}, num_rdma_bytes={self.num_rdma_bytes}, "
            f"groups={len(self._groups.all_groups())})"
        )

    @property
    def groups(self) -> list[Any]:
        """(ncclep only) The ncclep groups this Buffer has made so far."""
        return self._groups.all_groups()

    def _open(self) -> None:
        if self._groups.closed:
            raise NcclepError("the Buffer was destroyed")

    def destroy(self) -> None:
        """
        Destroy the ncclep groups and release their resources (a collective).
        """
        if not self.explicitly_destroy:
            raise InvalidArgument("`explicitly_destroy` flag must be set")
        self._groups.close()
        self._ll.plans.clear()

    @staticmethod
    def is_sm90_compiled() -> bool:
        """Whether the FP8 paths are available: always, on every ncclep backend (the reference
        backend included)."""
        return True

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """
        Set the number of SMs to use in high-throughput kernels.

        Arguments:
            new_num_sms: the new number to be set (even, as DeepEP requires). ncclep: it applies
                to the HT groups made afterwards.
        """
        if new_num_sms % 2:
            raise InvalidArgument("The SM count must be even")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """
        Capture an event on the current stream, i.e. `torch.cuda.current_stream()` (on the CPU: an
        event that has already passed).

        Returns:
            ``event``, the captured event.
        """
        return EventOverlap(EventHandle())

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
    ) -> int:
        """
        Get a minimum size requirement for the RDMA buffer.

        Arguments:
            num_max_dispatch_tokens_per_rank: the maximum number of tokens to dispatch, all the ranks
                must hold the same value.
            hidden: the hidden dimension of each token.
            num_ranks: the number of EP group ranks.
            num_experts: the number of all experts.

        Returns:
            ``size``, the bytes of the ncclep LL group for these sizes and the largest top-k the LL kernels
            take (ncclep's figure, not DeepEP's).
        """
        return budget.low_latency_rdma_size_hint(
            num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts
        )

    def get_comm_stream(self) -> torch.Stream:
        """
        Get the communication stream (the stream ``async_finish`` calls run on; CUDA only).

        Returns:
            ``stream``, the communication stream.
        """
        if not torch.cuda.is_available():
            raise InvalidArgument("get_comm_stream: there are no streams without CUDA")
        return self._streams.comm_stream(torch.device("cuda", torch.cuda.current_device()))

    def get_local_buffer_tensor(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """DeepEP's raw buffer: ncclep has no Buffer-wide raw buffer (raises)."""
        raise InvalidArgument("get_local_buffer_tensor: ncclep.deep_ep.Buffer holds no raw buffer")

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """
        Get a recommended dispatch config.

        Arguments:
            num_ranks: the number of ranks.

        Returns:
            ``config``, ``Config(Buffer.num_sms)`` for any number of ranks (ncclep uses only its SMs).
        """
        return Config(Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """
        Get a recommended combine config.

        Arguments:
            num_ranks: the number of ranks.

        Returns:
            ``config``, ``Config(Buffer.num_sms)`` for any number of ranks (ncclep uses only its SMs).
        """
        return Config(Buffer.num_sms)

    # ------------------------------------------------------------------------------ HT

    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, EventOverlap]:
        """
        Calculate the layout required for later communication (device ops only: no host
        synchronisation, no communication).

        Arguments:
            topk_idx: `[num_tokens, num_topk]`, dtype `deep_ep.topk_idx_t` (`torch.int64`; int32 works
                too), the expert indices selected by each token, `-1` means no selections.
            num_experts: the number of experts.
            previous_event: the event to wait before actually executing the kernel.
            async_finish: the current stream will not wait for the communication kernels to be finished
                if set.
            allocate_on_comm_stream: control whether all the allocated tensors' ownership to be on the
                communication stream.

        Returns:
            tuple: the five values below, in this order

            - ``num_tokens_per_rank``: `[num_ranks]` with `torch.int`, the number of tokens to be sent to each
              rank.
            - ``num_tokens_per_rdma_rank``: `[num_rdma_ranks]` with `torch.int`, the number of tokens to be
              sent to each node, `None` when the group is on one node.
            - ``num_tokens_per_expert``: `[num_experts]` with `torch.int`, the number of tokens to be sent to
              each expert.
            - ``is_token_in_rank``: `[num_tokens, num_ranks]` with `torch.bool`, whether a token be sent to a
              rank.
            - ``event``: the event after executing the kernel (valid only if `async_finish` is set).
        """
        if self._groups.closed:
            raise NcclepError("the Buffer was destroyed")
        if allocate_on_comm_stream:
            _check_comm_stream_allocation(allocate_on_comm_stream, previous_event, async_finish)
        layout, event = self._ht.layout(topk_idx, num_experts, previous_event, async_finish)
        return (*layout, event)

    def dispatch(
        self,
        x: Payload,
        handle: DispatchHandle | None = None,
        num_tokens_per_rank: torch.Tensor | None = None,
        num_tokens_per_rdma_rank: torch.Tensor | None = None,
        is_token_in_rank: torch.Tensor | None = None,
        num_tokens_per_expert: torch.Tensor | None = None,
        topk_idx: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[
        Payload,
        torch.Tensor | None,
        torch.Tensor | None,
        list[int] | None,
        DispatchHandle | None,
        EventOverlap,
    ]:
        """
        Dispatch tokens to different ranks, on one node or several.

        Arguments:
            x: `torch.Tensor` or tuple of `torch.Tensor`. For the first type, the shape must be
                `[num_tokens, hidden]` and the type `torch.bfloat16` (hidden a multiple of 8). For the
                second, the first element must be `[num_tokens, hidden]` `torch.float8_e4m3fn` (hidden a
                multiple of 128), the second its scales: `[num_tokens, hidden // 128]` `torch.float` (any
                strides), or UE8M0 scales packed as `[num_tokens, hidden // 512]` `torch.int`.
            handle: an optional communication handle; if set, the tokens go where that dispatch sent
                theirs (a cached dispatch: no counts are exchanged, no top-k may be given).
            num_tokens_per_rank: `[num_ranks]` with `torch.int`, the number of tokens to be sent to each
                rank.
            num_tokens_per_rdma_rank: `[num_rdma_ranks]` with `torch.int` (ncclep: accepted, unused).
            is_token_in_rank: `[num_tokens, num_ranks]` with `torch.bool`, whether a token be sent to a
                rank.
            num_tokens_per_expert: `[num_experts]` with `torch.int`, the number of tokens to be sent to
                each expert.
            topk_idx: `[num_tokens, num_topk]` with `deep_ep.topk_idx_t` (typically `torch.int64`), the
                expert indices selected by each token, `-1` means no selections.
            topk_weights: `[num_tokens, num_topk]` with `torch.float`, the expert weights of each token to
                dispatch.
            expert_alignment: align the number of tokens received by each local expert to this variable.
            num_worst_tokens: the worst number of tokens to receive; if specified, there is no CPU sync
                and the call is CUDA-graph compatible (where ncclep's CUDA backend runs). ncclep: the HT
                group then takes `ceil(num_worst_tokens / num_ranks)` tokens per rank (unless it already
                takes more), and no rank may pass more tokens than that.
            config: the performance tuning config (ncclep: its `num_sms` applies when this call makes an
                HT group).
            previous_event: the event to wait before actually executing the kernel.
            async_finish: the current stream will not wait for the communication kernels to be finished
                if set.
            allocate_on_comm_stream: control whether all the allocated tensors' ownership to be on the
                communication stream.

        Returns:
            tuple: the six values below, in this order

            - ``recv_x``: received tokens, the same type and tuple as the input `x`, but the number of tokens
              equals to the received token count (`num_worst_tokens` rows if given), ordered by source rank,
              then token index.
            - ``recv_topk_idx``: received expert indices: local expert ids, `-1` for experts of other ranks
              and on rows past the received tokens; the dtype of `topk_idx`; None without `topk_idx`.
            - ``recv_topk_weights``: received expert weights (0 where `recv_topk_idx` is `-1`); None without.
            - ``num_recv_tokens_per_expert_list``: Python list shaped `[num_local_experts]`, the received
              token count by each local expert, aligned to the input `expert_alignment`. If `num_worst_tokens`
              is specified, the list will be empty.
            - ``handle``: the returned communication handle (None for a cached dispatch).
            - ``event``: the event after executing the kernel (valid only if `async_finish` is set).

        ncclep: without `num_worst_tokens`, every rank's layout counts are gathered and read on the host
        before the tokens move (DeepEP's exact-size synchronisation, as one `all_gather`); that also
        agrees on the tokens per rank of the HT group, which grows (a new group, a collective) when a call
        passes more than it holds. The returned rows are views of ncclep's worst-case outputs.
        """
        if self._groups.closed:
            raise NcclepError("the Buffer was destroyed")
        if allocate_on_comm_stream:
            _check_comm_stream_allocation(allocate_on_comm_stream, previous_event, async_finish)
        if num_worst_tokens < 0:
            raise InvalidArgument(f"num_worst_tokens must be >= 0, got {num_worst_tokens}")
        if config is not None and not isinstance(config, Config):
            raise InvalidArgument(f"config must be a deep_ep.Config, got {type(config).__name__}")
        if handle is not None:
            if topk_idx is not None or topk_weights is not None:
                raise InvalidArgument("a cached dispatch (handle given) takes no topk_idx or topk_weights")
            if not isinstance(handle, DispatchHandle):
                raise InvalidArgument(
                    f"handle must come from this Buffer's dispatch, got {type(handle).__name__}"
                )
            recv_x, event = self._ht.cached_dispatch(x, handle, previous_event, async_finish)
            return recv_x, None, None, None, None, event
        num_sms = Buffer.num_sms if config is None else config.num_sms
        return self._ht.dispatch(
            x,
            num_tokens_per_rank,
            is_token_in_rank,
            num_tokens_per_expert,
            topk_idx,
            topk_weights,
            expert_alignment,
            num_worst_tokens,
            num_sms,
            previous_event,
            async_finish,
        )

    def combine(
        self,
        x: torch.Tensor,
        handle: DispatchHandle,
        topk_weights: torch.Tensor | None = None,
        bias: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
        config: Config | None = None,
        previous_event: EventOverlap | None = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, EventOverlap]:
        """
        Combine (reduce) tokens (addition **without** weights) from different ranks.

        Arguments:
            x: `[num_tokens, hidden]` with `torch.bfloat16`, the tokens to send for reducing to its
                original ranks (the rows of the dispatch, after the experts).
            handle: a must-set communication handle, you can obtain this from the dispatch function.
            topk_weights: `[num_tokens, num_topk]` with `torch.float`, the tokens' top-k weights for
                reducing to its original ranks.
            bias: 0, 1 or 2 `[num_tokens, hidden]` with `torch.bfloat16` final bias to the output
                (ncclep: added in fp32 to the bf16 combined rows, then rounded to bf16 again).
            config: the performance tuning config (ncclep: unused).
            previous_event: the event to wait before actually executing the kernel.
            async_finish: the current stream will not wait for the communication kernels to be finished
                if set.
            allocate_on_comm_stream: control whether all the allocated tensors' ownership to be on the
                communication stream.

        Returns:
            tuple: ``(recv_x, recv_topk_weights, event)``

            - ``recv_x``: the reduced token from its dispatched ranks (summed in fp32, in rank order).
            - ``recv_topk_weights``: the reduced top-k weights from its dispatch ranks.
            - ``event``: the event after executing the kernel (valid only if `async_finish` is set).

        ncclep: the rows are copied into ncclep's worst-case `[N, hidden]` layout first, unless the
        dispatch returned `N` rows (`num_worst_tokens = N`).
        """
        if self._groups.closed:
            raise NcclepError("the Buffer was destroyed")
        if allocate_on_comm_stream:
            _check_comm_stream_allocation(allocate_on_comm_stream, previous_event, async_finish)
        if not isinstance(handle, DispatchHandle):
            raise InvalidArgument(
                f"handle must come from this Buffer's dispatch, got {type(handle).__name__}"
            )
        biases: tuple[torch.Tensor, ...] = ()
        if bias is None:
            pass
        elif isinstance(bias, torch.Tensor):
            biases = (bias,)
        elif isinstance(bias, tuple):
            if len(bias) != 2:
                raise InvalidArgument("bias must be a tensor or a tuple of two tensors")
            biases = tuple(b for b in bias if b is not None)
        else:
            raise InvalidArgument(
                f"bias must be a tensor or a tuple of two tensors, got {type(bias).__name__}"
            )
        return self._ht.combine(x, handle, topk_weights, biases, previous_event, async_finish)

    # ------------------------------------------------------------------------------ LL

    def clean_low_latency_buffer(
        self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int
    ) -> None:
        """
        DeepEP zeroes part of its LL buffer after HT calls. ncclep's LL groups need no cleaning
        (HT calls never touch them), so this only checks that the sizes fit the byte budget.

        Arguments:
            num_max_dispatch_tokens_per_rank: the maximum number of tokens to dispatch, all the ranks
                must hold the same value.
            hidden: the hidden dimension of each token.
            num_experts: the number of all experts.
        """
        self._open()
        self._ll.check_budget(num_experts, num_max_dispatch_tokens_per_rank, hidden, 1)

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: torch.Tensor | None = None,
        dispatch_wait_recv_cost_stats: torch.Tensor | None = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        *,
        topk_weights: torch.Tensor | None = None,
    ) -> tuple[Any, torch.Tensor, LowLatencyHandle, EventOverlap, Callable[[], None] | None]:
        """
        A low-latency dispatch: no host synchronisation, fixed output shapes (CUDA-graph compatible where
        ncclep's CUDA backend runs). ncclep: there is no limit of two result sets alive at a time; every
        call returns fresh tensors.

        Arguments:
            x: `torch.Tensor` with `torch.bfloat16`, shaped as `[num_tokens, hidden]` (hidden a multiple
                of 128). The number of tokens must be at most `num_max_dispatch_tokens_per_rank`.
            topk_idx: `torch.Tensor` with `deep_ep.topk_idx_t` (typically `torch.int64`), shaped as
                `[num_tokens, num_topk]`. `-1` indices (not selecting any expert) are supported.
            num_max_dispatch_tokens_per_rank: the maximum number of tokens to dispatch, all the ranks must
                hold the same value.
            num_experts: the number of all experts.
            cumulative_local_expert_recv_stats: a cumulative expert count tensor for statistics, shaped
                `[num_local_experts]` and typed `torch.int`; the received counts are added to it.
            dispatch_wait_recv_cost_stats: (ncclep: not supported; a tensor raises).
            use_fp8: whether to enable FP8 casting, with this, the received data will be a tuple of FP8
                tensor and scaling factors.
            round_scale: whether round the scaling factors into power of 2.
            use_ue8m0: whether use UE8M0 as scaling factor format (available only with
                `round_scale=True`; hidden a multiple of 512).
            async_finish: the current stream will not wait for the communication kernels to be finished
                if set.
            return_recv_hook: return a receiving hook if set. If set, the call only sends; the returned
                tensors hold the data once the hook has been called (ncclep: until then they are
                placeholders, see `docs/deep_ep.md`).
            topk_weights: (ncclep only) `[num_tokens, num_topk]` `torch.float`, the weights the combine
                will use. A combine passed this same tensor (unmodified) uses the weights that
                travelled with the dispatch; the combine's kernel sends any other tensor to the expert
                ranks first.

        Returns:
            tuple: ``(recv_x, recv_count, handle, event, hook)``

            - ``recv_x``: a tensor or tuple with received tokens for each expert. With `use_fp8=True`: the
              first element is a `torch.Tensor` shaped as `[num_local_experts,
              num_max_dispatch_tokens_per_rank * num_ranks, hidden]` with `torch.float8_e4m3fn`. The second
              tensor is the corresponding scales for the first element with shape `[num_local_experts,
              num_max_dispatch_tokens_per_rank * num_ranks, hidden // 128]` with `torch.float`, if
              `use_ue8m0=False`. With `use_ue8m0=True`, the second one is packed and shaped as
              `[num_local_experts, num_max_dispatch_tokens_per_rank * num_ranks, hidden // 512]` with type
              `torch.int`. The last two dimensions of the scaling tensors are column-major. With
              `use_fp8=False`, the result is a `torch.bfloat16` tensor shaped as `[num_local_experts,
              num_max_dispatch_tokens_per_rank * num_ranks, hidden]`. Only the first `recv_count[e]` rows of
              expert `e` are valid; ncclep orders them by source rank, then token index.
            - ``recv_count``: a tensor shaped `[num_local_experts]` with type `torch.int`, indicating how many
              tokens each expert receives.
            - ``handle``: the communication handle to be used in the `low_latency_combine` function.
            - ``event``: the event after executing the kernel (valid only if `async_finish` is set).
            - ``hook``: the receiving hook function (valid only if `return_recv_hook` is set).
        """
        return self._ll.dispatch(
            x,
            topk_idx,
            num_max_dispatch_tokens_per_rank,
            num_experts,
            cumulative_local_expert_recv_stats,
            dispatch_wait_recv_cost_stats,
            use_fp8,
            round_scale,
            use_ue8m0,
            async_finish,
            return_recv_hook,
            topk_weights,
        )

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: LowLatencyHandle,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: torch.Tensor | None = None,
        combine_wait_recv_cost_stats: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, EventOverlap, Callable[[], None] | None]:
        """
        A low-latency combine (reduce **with weights**): no host synchronisation.

        Arguments:
            x: `[num_local_experts, num_max_dispatch_tokens_per_rank * num_ranks, hidden]` with
                `torch.bfloat16`, the local calculated tokens to be sent to this original rank and
                reduced.
            topk_idx: `[num_combined_tokens, num_topk]` with `deep_ep.topk_idx_t`, the expert indices
                selected by the dispatched tokens (ncclep: checked for shape only; the routing is the
                handle's).
            topk_weights: `[num_combined_tokens, num_topk]` with `torch.float`, the expert weights
                selected by the dispatched tokens. The received tokens will be reduced with the weights in
                this tensor (ncclep: sent to the expert ranks first, one small all-to-all, unless the
                dispatch was given this same tensor).
            handle: the communication handle given by the `dispatch` function.
            use_logfmt: (ncclep: not supported; True raises).
            zero_copy: whether the rows are already in `get_next_low_latency_combine_buffer(handle)`
                (ncclep: then that buffer is read and `x` only checked for shape).
            async_finish: the current stream will not wait for the communication kernels to be finished
                if set.
            return_recv_hook: return a receiving hook if set: the call only sends, the result is there
                once the hook has been called.
            out: the in-place output tensor, if set, the kernel will write the result to this tensor and
                return it directly.
            combine_wait_recv_cost_stats: (ncclep: not supported; a tensor raises).

        Returns:
            tuple: ``(combined_x, event, hook)``

            - ``combined_x``: the reduced token tensor, with shape `[num_combined_tokens, hidden]` and type
              `torch.bfloat16`: each expert rank sums its experts' weighted rows in fp32, the token's rank
              sums those in rank order in fp32.
            - ``event``: the event after executing the kernel (valid only if `async_finish` is set).
            - ``hook``: the receiving hook function (valid only if `return_recv_hook` is set).
        """
        if use_logfmt:
            raise InvalidArgument("use_logfmt=True: ncclep combines in bf16 (no LogFMT)")
        if combine_wait_recv_cost_stats is not None:
            raise InvalidArgument("combine_wait_recv_cost_stats: ncclep does not time per-rank waits")
        if async_finish and return_recv_hook:
            raise InvalidArgument("async_finish and return_recv_hook cannot both be set")
        if type(handle) is not LowLatencyHandle:
            raise InvalidArgument(f"handle must come from low_latency_dispatch, got {type(handle).__name__}")
        if self._groups.closed:
            raise NcclepError("the Buffer was destroyed")
        return self._ll.combine(
            x, topk_idx, topk_weights, handle, zero_copy, async_finish, return_recv_hook, out
        )

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """
        Get the buffer a `zero_copy` combine reads, so that the experts can write their output there.

        Arguments:
            handle: the communication handle given by the `dispatch` function.

        Returns:
            ``buffer``, a BF16 tensor shaped `[num_local_experts, num_ranks *
            num_max_dispatch_tokens_per_rank, hidden]` (ncclep: an ordinary contiguous tensor, one per size,
            reused by every call).
        """
        self._open()
        if not isinstance(handle, LowLatencyHandle):
            raise InvalidArgument(f"handle must come from low_latency_dispatch, got {type(handle).__name__}")
        return self._ll.next_combine_buffer(handle)

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """DeepEP's rank masking: not supported by ncclep (raises)."""
        raise InvalidArgument("low_latency_update_mask_buffer: ncclep has no rank masking (enable_shrink)")

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """DeepEP's rank masking: not supported by ncclep (raises)."""
        raise InvalidArgument("low_latency_query_mask_buffer: ncclep has no rank masking (enable_shrink)")

    def low_latency_clean_mask_buffer(self) -> None:
        """DeepEP's rank masking: not supported by ncclep (raises)."""
        raise InvalidArgument("low_latency_clean_mask_buffer: ncclep has no rank masking (enable_shrink)")


def _check_comm_stream_allocation(
    allocate_on_comm_stream: bool, previous_event: Any, async_finish: bool
) -> None:
    if allocate_on_comm_stream and (previous_event is None or not async_finish):
        raise InvalidArgument("allocate_on_comm_stream=True needs previous_event and async_finish=True")
