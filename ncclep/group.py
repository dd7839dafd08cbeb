"""``ncclep.Group``: one expert-parallel communicator and the four ops on it."""

from __future__ import annotations

import itertools
import os
import socket
import zlib
from collections.abc import Callable
from typing import Any, Generic, NoReturn, TypeVar

import torch
import torch.distributed as dist

from . import _native, backends, collectives, env, ops, outputs, registry, validate
from .bootstrap import init_from_mpi, is_mpi_comm
from .config import MODE_IDS, GroupConfig
from .errors import PEER_LOST, PEER_REJECTED, TIMEOUT, CommError, InvalidArgument, NcclepError
from .handles import HTDispatchOutput, HTHandle, LLDispatchOutput, LLHandle, claim

T = TypeVar("T")
BACKENDS = backends.BACKENDS

_ids = itertools.count(1)


def get_group(group_id: int) -> Group:
    """The open group with this id (ops carry groups as integers)."""
    return registry.lookup(group_id).group


class Pending(Generic[T]):
    """The receive half of a ``send_only`` call: ``wait()`` (or calling it) finishes it once.

    ``early``: for an LL dispatch or combine on the CUDA backend, the outputs ``wait()`` will
    return, already allocated by the send half (their values arrive with ``wait()``); None where the
    backend makes them in the receive half (the reference backend) and for the HT ops.
    """

    def __init__(self, finish: Callable[[], T], early: T | None = None) -> None:
        self._finish: Callable[[], T] | None = finish
        self._result: T | None = None
        self.early = early

    def wait(self) -> T:
        if self._finish is not None:
            self._result = self._finish()
            self._finish = None
        return self._result  # type: ignore[return-value]

    __call__ = wait


class Group:
    """An expert-parallel group over a torch.distributed process group or an mpi4py communicator.

    Args:
        num_experts: experts in the whole model; divisible by the world size. Rank r holds experts
            ``[r*L, (r+1)*L)`` with ``L = num_experts / world_size``.
        max_tokens_per_rank: the most tokens any rank passes to one dispatch (T); output shapes
            are sized from it.
        hidden: the largest hidden size the group will move.
        mode: ``"ll"`` (decode, low latency) or ``"ht"`` (prefill and training).
        process_group: a torch.distributed group (default WORLD) or an mpi4py communicator.
        max_topk: the largest top-k the group accepts.
        num_sms: SMs the kernels may use (None: the mode's default).
        timeout_s: deadline of every wait: the kernels' on the CUDA backend, every collective's on
            the reference backend (and group creation's exchange on both). A wait past it raises
            :class:`ncclep.CommError` and breaks the group.
        backend: ``"auto"`` (the CUDA kernels where they can serve the group, else the reference
            backend, with a :class:`ncclep.FallbackWarning` naming the reason when the group is on
            CUDA devices), ``"reference"`` or ``"cuda"`` (raises :class:`ncclep.NcclepError` with
            the reason when the kernels cannot serve the group).

    ``group.backend`` says which backend runs the ops and ``group.backend_reason`` why it is not
    ``"cuda"`` (None when it is).

    Failures end on every rank. Bad arguments raise :class:`ncclep.InvalidArgument` at once on the
    rank that passed them; that rank still takes part in the call, with no rows and its reason in
    their place, so every peer hears of it instead of waiting: the peer raises
    :class:`ncclep.CommError` with ``reason="peer_rejected"`` and ``peer`` that rank, and the group
    stays usable (``CommError.group_usable``). When the peer raises differs by backend:

    - reference backend: in that same call; nothing was moved on any rank.
    - CUDA backend: good calls never wait for the host, so the peer's call returns, its kernels
      taking the rejecting rank's part as empty, and the rejection is raised by the first later
      call on the group that starts after those kernels finished (it then takes no part in any
      exchange: make it again), or by :meth:`check`, which synchronises first. The outputs of the
      rejected call on the peer lack the rejecting rank's part: discard them. A peer whose part
      of a combine or cached dispatch exchanged nothing with the rejecting rank is not told.

    Bad expert ids are found by the CUDA kernels without a host sync: that call treats them as -1
    and the bad rank's next call (or :meth:`check`) raises InvalidArgument, taking no part either.
    A missing, dead or out-of-step peer raises CommError within ``timeout_s`` and breaks the group
    (``group_usable`` False; every later call raises ``reason="broken"``): close it and open a new
    one on every rank. On the reference backend open it on a new process group (the old one may
    still hold the abandoned exchange); on the CUDA backend the same process group serves, unless
    a process died. Every rank must make the same calls on a group in the same order.
    """

    def __init__(
        self,
        num_experts: int,
        max_tokens_per_rank: int,
        hidden: int,
        mode: str = "ll",
        process_group: Any = None,
        max_topk: int = 8,
        num_sms: int | None = None,
        timeout_s: float = 100.0,
        backend: str = "auto",
    ) -> None:
        problems: list[InvalidArgument] = []
        if backend not in BACKENDS:
            problems.append(
                InvalidArgument(f"backend must be one of {BACKENDS}, got {backend!r}", reason="option")
            )
        self._mpi_comm = process_group if is_mpi_comm(process_group) else None
        if self._mpi_comm is not None:
            process_group = init_from_mpi(self._mpi_comm, "nccl" if torch.cuda.is_available() else "gloo")
        if not dist.is_initialized():
            raise NcclepError(
                "torch.distributed is not initialised: call init_process_group first, "
                "or pass an mpi4py communicator"
            )
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        try:
            self.rank = dist.get_rank(self.process_group)
            self.world_size = dist.get_world_size(self.process_group)
        except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
            raise InvalidArgument(
                "process_group must be a torch.distributed ProcessGroup or an mpi4py communicator, "
                f"got {type(process_group).__name__} ({exc})",
                reason="type",
            ) from None
        if self.rank < 0:
            raise InvalidArgument("this rank is not a member of process_group", reason="option")
        self.config: GroupConfig
        try:
            self.config = GroupConfig(
                num_experts=num_experts,
                max_tokens_per_rank=max_tokens_per_rank,
                hidden=hidden,
                mode=mode,
                world_size=self.world_size,
                max_topk=max_topk,
                num_sms=num_sms,
                timeout_s=timeout_s,
            )
        except InvalidArgument as exc:
            problems.append(exc)
        try:
            env.virtual_nodes()
        except InvalidArgument as exc:
            problems.append(exc)
        self.device = self._pick_device()
        arguments = dict(
            num_experts=num_experts,
            max_tokens_per_rank=max_tokens_per_rank,
            hidden=hidden,
            mode=mode,
            max_topk=max_topk,
            num_sms=num_sms,
            # 4 and 4.0 are the same deadline
            timeout_s=float(timeout_s)
            if isinstance(timeout_s, int) and not isinstance(timeout_s, bool)
            else timeout_s,
            backend=backend,
        )
        # Before anything else the ranks meet once (bounded): a rank whose arguments are bad
        # still comes, so every rank raises instead of its peers waiting in the next collective.
        key, self._hosts = self._agree(arguments, problems[0] if problems else None, timeout_s)
        self._native: Any = None
        self._native_info: dict[str, Any] = {}
        if self.device.type == "cuda" and _native.available() and backend != "reference":
            self._open_native()
        self.backend, self.backend_reason = backends.choose(backend, self.config, self.device, self._native)
        if self.backend != "cuda" and self._native is not None:
            self._native.close()  # the reference backend needs none of its window
            self._native = None
        self._local_ranks, self._nodes = self._topology()
        self._backend = backends.build(
            self.backend, self.config, self.rank, self.process_group, self._native, self.device, key
        )
        # Compiled graphs hold the id as a constant and the fake kernels read the sizes through
        # it; folding the sizes into the id keeps torch.compile's on-disk caches (keyed on the
        # graph) from handing a graph traced for one configuration to a group with another.
        self.id = (zlib.crc32(repr(self.config).encode()) << 20) | (next(_ids) & 0xFFFFF)
        self._checks = validate.Checks(self.config, self.device)
        registry.add(self.id, registry.Entry(self, self.config, self._backend, self._checks))

    # ----------------------------------------------------------------------------- set-up

    def _pick_device(self) -> torch.device:
        pg_backend = str(dist.get_backend(self.process_group))
        if "nccl" in pg_backend and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _agree(
        self, arguments: dict[str, Any], problem: InvalidArgument | None, timeout_s: Any
    ) -> tuple[int, list[str]]:
        """One bounded all-gather of every rank's arguments, host name and verdict on them.

        Returns (the group's key, the same on every rank; host names by rank). Raises, on every
        rank alike: this rank's InvalidArgument; CommError naming a peer whose arguments were
        rejected; InvalidArgument when the ranks passed different arguments.
        """
        ok_timeout = (
            isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool) and 0 < timeout_s < 1e6
        )
        wait_s = float(timeout_s) if ok_timeout else 100.0
        record = dict(
            status=0 if problem is None else problem.code,
            text=None if problem is None else str(problem)[:400],
            args={k: repr(v) for k, v in arguments.items()},
            host=socket.gethostname()[:200],
            nonce=int.from_bytes(os.urandom(8), "little") >> 2,  # not random: users seed it
        )
        try:
            records = collectives.all_gather_json(record, 2048, self.process_group, self.device, wait_s)
        except (collectives.Expired, collectives.Failed) as exc:
            what = "passed the deadline" if isinstance(exc, collectives.Expired) else f"failed ({exc})"
            raise CommError(
                f"group creation: rank {self.rank}'s exchange with its peers {what} after "
                f"timeout_s={wait_s:g} s: every rank of the process group must create the group",
                phase="group creation",
                rank=self.rank,
                reason=TIMEOUT if isinstance(exc, collectives.Expired) else PEER_LOST,
            ) from None
        if problem is not None:
            raise problem
        if any(r is None for r in records):
            raise CommError("group creation: a peer sent an unreadable record", phase="group creation")
        for peer, r in enumerate(records):
            if r["status"]:
                raise CommError(
                    f"group creation: rank {peer} rejected its arguments ({r['text']})",
                    phase="group creation",
                    rank=self.rank,
                    peer=peer,
                    reason=PEER_REJECTED,
                )
        mine = record["args"]
        for peer, r in enumerate(records):
            diff = [k for k in mine if r["args"].get(k) != mine[k]]
            if diff:
                detail = ", ".join(f"{k}={r['args'].get(k)} there, {mine[k]} here" for k in diff)
                raise InvalidArgument(
                    f"ranks {self.rank} and {peer} passed different arguments to Group ({detail}): "
                    "every rank must pass the same",
                    reason="option",
                )
        return int(records[0]["nonce"]), [str(r["host"]) for r in records]

    def _broadcast_from_rank0(self, value: Any) -> Any:
        if self._mpi_comm is not None:
            return self._mpi_comm.bcast(value, root=0)
        box = [value]
        dist.broadcast_object_list(
            box, src=dist.get_global_rank(self.process_group, 0), group=self.process_group
        )
        return box[0]

    def _open_native(self) -> None:
        c = _native.module()
        cfg = self.config
        unique_id = self._broadcast_from_rank0(c.get_unique_id() if self.rank == 0 else None)
        self._native = c.Communicator(
            unique_id,
            self.world_size,
            self.rank,
            self.device.index,
            MODE_IDS[cfg.mode],
            cfg.num_experts,
            cfg.max_tokens_per_rank,
            cfg.hidden,
            cfg.max_topk,
            cfg.num_sms or 0,
            cfg.timeout_s,
            virtual_nodes=env.virtual_nodes(),
        )
        self._native_info = dict(self._native.info())

    def _topology(self) -> tuple[int, int]:
        """(ranks per node, nodes), with NCCLEP_VIRTUAL_NODES splitting each host."""
        virtual = env.virtual_nodes()
        if self._native_info.get("device_api"):
            per_host = int(self._native_info["lsa_size"])
            hosts = int(self._native_info["n_lsa_teams"])
        else:
            names = self._hosts
            per_host = names.count(names[self.rank])
            hosts = len(set(names))
        if per_host % virtual:
            raise InvalidArgument(
                f"NCCLEP_VIRTUAL_NODES={virtual} does not divide the {per_host} ranks of a host",
                reason="option",
            )
        return per_host // virtual, hosts * virtual

    # ----------------------------------------------------------------------------- properties

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def num_local_experts(self) -> int:
        return self.config.num_local_experts

    @property
    def max_tokens_per_rank(self) -> int:
        return self.config.max_tokens_per_rank

    @property
    def hidden(self) -> int:
        return self.config.hidden

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def ranks_per_node(self) -> int:
        return self._local_ranks

    @property
    def num_nodes(self) -> int:
        return self._nodes

    @property
    def buffer_bytes(self) -> int:
        """Device memory the group holds between calls (the reference backend holds none)."""
        return int(self._native_info.get("window_bytes", 0)) if self.backend == "cuda" else 0

    @property
    def kernel_sms(self) -> int | None:
        """SMs the CUDA kernels of this group use (None on the reference backend)."""
        return int(self._native_info["kernel_sms"]) if self.backend == "cuda" else None

    @property
    def native_info(self) -> dict[str, Any]:
        """What the CUDA extension reported at creation (empty without it): LSA team, Device API."""
        return dict(self._native_info)

    def check_lsa(self) -> bool:
        """Run the extension's LSA store/barrier self-check (a device-side round trip to each peer)."""
        if self._native is None:
            raise NcclepError("check_lsa needs the CUDA extension and a group on CUDA devices")
        return bool(self._native.check_lsa(torch.cuda.current_stream(self.device).cuda_stream))

    def check(self) -> None:
        """Wait for this group's work on the current stream, then raise what a kernel reported."""
        if self.backend == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
            self._backend.raise_device_error()

    @property
    def closed(self) -> bool:
        return not registry.contains(self.id)

    def close(self) -> None:
        registry.remove(self.id)
        if self._native is not None:
            self._native.close()
            self._native = None

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        cfg = self.config
        return (
            f"ncclep.Group(id={self.id}, mode={cfg.mode!r}, backend={self.backend!r}, rank={self.rank}/"
            f"{self.world_size}, experts={cfg.num_experts}, T={cfg.max_tokens_per_rank}, "
            f"hidden={cfg.hidden})"
        )

    def _require_open(self) -> None:
        if self.closed:
            raise NcclepError(f"group {self.id} is closed")

    def _reject(self, op: str, problem: InvalidArgument) -> NoReturn:
        """``op``'s host-side checks failed here: this rank still takes part in the op (the
        backend's ``reject``: no rows, the reason in their place), so that every peer hears of it
        (see the class docstring), then raises ``problem``."""
        self._backend.reject(op, problem)

    def _stamp(self, out: T) -> T:
        """The output, fresh from the backend or the op, with its handle marked as this group's (a
        combine elsewhere refuses it)."""
        claim(out[-1], self.id)  # type: ignore[index]  # the handle is the last field of every output
        return out

    # ----------------------------------------------------------------------------- LL

    def ll_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        use_fp8: bool = False,
        ue8m0: bool = False,
        send_only: bool = False,
        column_major_scales: bool = False,
        round_scale: bool = False,
    ) -> LLDispatchOutput | Pending[LLDispatchOutput]:
        """Send each token to the ranks of its top-k experts; returns expert-major rows (decode).

        Collective: every rank of the group calls it, in the same order as its other LL calls.

        Args:
            x: ``[B, H]`` bfloat16 on the group's device, contiguous; ``B <= max_tokens_per_rank``
                (0 allowed), ``H <= hidden`` and divisible by 128.
            topk_idx: ``[B, K]`` int64 or int32 expert ids in ``[0, num_experts)``, -1 for none;
                ``K <= max_topk``; no expert twice in a row.
            topk_weights: ``[B, K]`` float32; combine multiplies each expert's output by it.
            use_fp8: send e4m3 with one scale per 128 channels instead of bfloat16.
            ue8m0: with ``use_fp8``, power-of-two scales as ``torch.float8_e8m0fnu``.
            send_only: launch the send half only; the result is a :class:`Pending` whose
                ``wait()`` runs the receive half and returns the outputs.
            column_major_scales: with ``use_fp8``, the scales stored with the row dimension
                innermost (strides ``(R*T*S, 1, R*T)``), the layout grouped GEMMs read with TMA
                (DeepEP's LL scales); with ``ue8m0`` too, the exponents packed four to an int32
                word, lowest byte first: int32 ``[L, R*T, H/512]`` (``H`` a multiple of 512). The
                kernel writes them so: no copy.
            round_scale: with ``use_fp8`` and without ``ue8m0``, float32 scales rounded up to
                powers of two: the fp8 values and scales of ``ue8m0``, each scale as the float32
                that ``torch.float8_e8m0fnu`` converts to (DeepEP's ``round_scale``).

        Returns:
            :class:`LLDispatchOutput` ``(x, scales, expert_counts, handle)``: ``x [L, R*T, H]``
            (bfloat16, or float8_e4m3fn with ``use_fp8``), ``scales [L, R*T, H/128]`` (float32 or
            float8_e8m0fnu; None without fp8), ``expert_counts [L]`` int32 on the device, and the
            :class:`LLHandle` for :meth:`ll_combine`. ``L`` local experts, ``R`` ranks,
            ``T = max_tokens_per_rank``. Rows of expert e are ordered by source rank, then token
            index; rows past ``expert_counts[e]`` are padding with unspecified contents. On
            the CUDA backend, when the call does not go through the custom op (eager calls with
            nothing tracing them, and ``send_only``), ``expert_counts`` and the handle's tensors
            are views of one allocation per dtype (fewer allocations, less host time; ``x`` and
            ``scales`` have their own). Each is a tensor of its own, but growing one in place
            (``resize_``, an ``out=`` larger than it) writes over the next, and freeing the
            storage of one (``untyped_storage().resize_(0)``) frees them all.

        Raises:
            InvalidArgument: a dtype, shape, device or size outside the above; nothing is moved,
                every peer raises :class:`CommError` naming this rank (see :class:`Group`) and
                the group stays usable. Out-of-range or repeated expert ids are found on the
                device without a host sync: the call treats them as -1 and the next call (or
                :meth:`check`) raises.
            CommError: a peer rejected its arguments (``reason="peer_rejected"``, the group stays
                usable), or a peer did not take part within ``timeout_s`` (the group can only be
                closed).
        """
        self._require_open()
        try:
            self._checks.ll_dispatch(
                x, topk_idx, topk_weights, use_fp8, ue8m0, send_only, column_major_scales, round_scale
            )
        except InvalidArgument as problem:
            self._reject("ll_dispatch", problem)
        if send_only:
            state = self._backend.dispatch_send(
                x, topk_idx, topk_weights, use_fp8, ue8m0, column_major_scales, round_scale
            )
            early = state.early
            return Pending(
                lambda: self._stamp(self._backend.dispatch_recv(state)),
                None if early is None else self._stamp(early),
            )
        if ops.eager(x):
            out = self._backend.dispatch(
                x, topk_idx, topk_weights, use_fp8, ue8m0, column_major_scales, round_scale
            )
            return self._stamp(out)
        outs = torch.ops.ncclep.ll_dispatch(
            self.id, x, topk_idx, topk_weights, use_fp8, ue8m0, column_major_scales, round_scale
        )
        return self._stamp(ll_output(outs, use_fp8))

    def ll_combine(
        self,
        expert_out: torch.Tensor,
        handle: LLHandle,
        out: torch.Tensor | None = None,
        send_only: bool = False,
        topk_weights: torch.Tensor | None = None,
    ) -> torch.Tensor | Pending[torch.Tensor]:
        """Bring the expert outputs back to each token's rank and reduce them (decode).

        ``out[b] = Σ_k topk_weights[b, k] · expert_out[row of (b, k)]``; each expert rank first sums
        a token's local experts in float32, so one bfloat16 row per (token, rank) travels back.

        Args:
            expert_out: ``[L, R*T, H]`` bfloat16, rows in :meth:`ll_dispatch`'s order (padding rows
                are ignored); ``H`` divisible by 128 and ``<= hidden``.
            handle: the :class:`LLHandle` of the matching dispatch on this group.
            out: optional ``[B, H]`` bfloat16 to write into (``B`` the dispatch's token count).
            send_only: launch the send half only; returns a :class:`Pending` for the receive half.
            topk_weights: optional ``[B, K]`` float32 (``K <= max_topk``) to weight choice ``k`` of
                token ``b`` with instead of the dispatch's weights (``k >= K``: 0), for callers that
                know the weights only after the dispatch (DeepEP's API). The kernel sends them to
                the expert ranks first: one more step of latency, no host work. Collective: every
                rank gives weights (a rank without tokens a ``[0, K]`` tensor), or none does.

        Returns:
            ``[B, H]`` bfloat16 (``out`` when given).

        Raises:
            InvalidArgument: a dtype or shape outside the above; CommError: as for dispatch.
        """
        self._require_open()
        try:
            self._checks.ll_combine(expert_out, handle, out, send_only, self.id, topk_weights)
        except InvalidArgument as problem:
            self._reject("ll_combine", problem)
        if send_only:
            state = self._backend.combine_send(expert_out, handle, out, topk_weights)
            return Pending(lambda: self._backend.combine_recv(state, out), state.early)
        if ops.eager(expert_out, topk_weights):
            return self._backend.combine(expert_out, handle, out, topk_weights)
        if out is not None:
            torch.ops.ncclep.ll_combine_out(self.id, expert_out, *handle.tensors(), out, topk_weights)
            return out
        return torch.ops.ncclep.ll_combine(self.id, expert_out, *handle.tensors(), topk_weights)

    # ----------------------------------------------------------------------------- HT

    def ht_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor | None = None,
        x_scales: torch.Tensor | None = None,
        layout: str = "flat",
        alignment: int = 1,
        send_only: bool = False,
    ) -> HTDispatchOutput | Pending[HTDispatchOutput]:
        """Send each token once to every rank holding one of its experts (prefill, training).

        Collective, in the same order on every rank as its other HT calls. Differentiable in ``x``
        and ``topk_weights`` (the backward is a combine of the gradients).

        Args:
            x: ``[B, H]`` bfloat16 (``H`` divisible by 8) or float8_e4m3fn (``H`` divisible by
                128, with ``x_scales``); ``B <= max_tokens_per_rank``, ``H <= hidden``.
            topk_idx: ``[B, K]`` int64 or int32 expert ids, -1 for none; ``K <= max_topk``.
            topk_weights: optional ``[B, K]`` float32, carried to the receiving rows.
            x_scales: fp8 only: ``[B, H/128]`` float32 or float8_e8m0fnu, moved with the rows.
            layout: ``"flat"`` (one row per received token, by source rank then token order) or
                ``"expert_major"`` (each token copied into the segment of every local expert it
                chose, segments padded to ``alignment`` rows).
            alignment: expert_major only: rows per segment are padded to a multiple of it.
            send_only: returns a :class:`Pending` whose ``wait()`` gives the outputs.

        Returns:
            :class:`HTDispatchOutput` ``(x [N, H], scales [N, H/128] | None, topk_idx [N, K]
            local expert ids (-1 where the expert is elsewhere), topk_weights [N, K] | None,
            num_recv [1] int32, expert_counts [L] int32, handle)``; ``topk_idx`` has the dtype of
            the given one. ``N`` is the worst case for the layout (``group.config.ht_num_rows``),
            so no host sync is needed; ``num_recv`` says how many rows are used. Unused rows have
            ``topk_idx`` -1 and weight 0. The outputs after ``x`` and ``scales`` may share one
            allocation per dtype, as in :meth:`ll_dispatch`.

        Raises:
            InvalidArgument: bad dtype, shape, device, size, layout or alignment (nothing moved;
                peers raise CommError as in :meth:`ll_dispatch`); bad expert ids are reported by
                the next call, as in LL.
            CommError: as in :meth:`ll_dispatch`.
        """
        self._require_open()
        try:
            self._checks.ht_dispatch(x, x_scales, topk_idx, topk_weights, layout, alignment, send_only)
        except InvalidArgument as problem:
            self._reject("ht_dispatch", problem)
        if send_only:
            state = self._backend.dispatch_send(x, x_scales, topk_idx, topk_weights, layout, alignment)
            return Pending(lambda: self._stamp(self._backend.dispatch_recv(state)))
        if ops.eager(x, topk_weights):
            return self._stamp(self._backend.dispatch(x, x_scales, topk_idx, topk_weights, layout, alignment))
        outs = torch.ops.ncclep.ht_dispatch(self.id, x, x_scales, topk_idx, topk_weights, layout, alignment)
        return self._stamp(ht_output(outs, x_scales is not None, topk_weights is not None))

    def ht_combine(
        self,
        x: torch.Tensor,
        handle: HTHandle,
        topk_weights: torch.Tensor | None = None,
        send_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None] | Pending[tuple[torch.Tensor, torch.Tensor | None]]:
        """Sum, for each token, the rows that came from it (the inverse of :meth:`ht_dispatch`).

        Args:
            x: ``[N, H]`` bfloat16, one row per dispatch output row (``N`` of the dispatch,
                ``H <= hidden``); rows no token uses are ignored. Or only its first ``n < N``
                rows when the rows past them hold no token: with the flat layout, the first
                ``num_recv`` rows (the rest are not read).
            handle: the :class:`HTHandle` of the matching dispatch on this group.
            topk_weights: optional ``[N, K]`` float32 (e.g. gradients in a backward pass), summed
                the same way (entries whose ``topk_idx`` is -1 skipped); ``[n, K]`` with ``n``
                rows of ``x``.
            send_only: returns a :class:`Pending` whose ``wait()`` gives the outputs.

        Returns:
            ``(out [B, H] bfloat16, weights [B, K] float32 | None)``: per token, the float32 sum of
            its rows over every rank, rounded to bfloat16 once. Differentiable in ``x``.

        Raises:
            InvalidArgument: a dtype or shape outside the above; CommError: as for dispatch.
        """
        self._require_open()
        try:
            self._checks.ht_combine(x, handle, topk_weights, send_only, self.id)
        except InvalidArgument as problem:
            self._reject("ht_combine", problem)
        if send_only:
            state = self._backend.combine_send(x, handle, topk_weights)
            return Pending(lambda: self._backend.combine_recv(state))
        if ops.eager(x, topk_weights):
            return self._backend.combine(x, handle, topk_weights)
        out, weights = torch.ops.ncclep.ht_combine(self.id, x, *handle.tensors(), topk_weights)
        return out, (weights if topk_weights is not None else None)

    def ht_dispatch_cached(self, x: torch.Tensor, handle: HTHandle) -> torch.Tensor:
        """Send ``x`` where an earlier :meth:`ht_dispatch` sent its tokens, along its handle: no
        counts are exchanged (the backward of :meth:`ht_combine`; DeepEP's cached dispatch).

        Collective, in the same order on every rank as its other HT calls.

        Args:
            x: ``[B, ...]``, any dtype, one row per token of that dispatch.
            handle: the :class:`HTHandle` of that dispatch.

        Returns:
            ``[N, ...]`` in ``x``'s dtype: row ``i`` holds the row of the token that the
            dispatch's row ``i`` holds, zeros on rows that hold no token.

        Raises:
            InvalidArgument: a shape outside the above, or rows over the kernels' limit; CommError:
                as for dispatch.
        """
        self._require_open()
        if not ops.eager(x):
            return torch.ops.ncclep.ht_dispatch_cached(
                self.id, x, handle.send_pos, handle.recv_slot, handle.recv_counts
            )
        try:
            self._checks.ht_dispatch_cached(x, handle, self.id)
        except InvalidArgument as problem:
            self._reject("ht_dispatch_cached", problem)
        return self._backend.dispatch_cached(x, handle)


def ll_output(outs: tuple[torch.Tensor, ...], use_fp8: bool) -> LLDispatchOutput:
    """The op's flat outputs as the method returns them (the op gives an empty tensor for None)."""
    recv_x, scales, *rest = outs
    return outputs.ll_dispatch_output((recv_x, scales if use_fp8 else None, *rest))


def ht_output(outs: tuple[torch.Tensor, ...], has_scales: bool, has_weights: bool) -> HTDispatchOutput:
    """The op's flat outputs as the method returns them (the op gives empty tensors for None)."""
    recv_x, scales, idx, weights, *rest = outs
    return outputs.ht_dispatch_output(
        (recv_x, scales if has_scales else None, idx, weights if has_weights else None, *rest)
    )
