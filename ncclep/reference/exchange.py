"""The reference backend's exchanges over torch.distributed: a header per call, then rows.

A message is one row of bytes; rows of several tensors are packed side by side so that one
collective moves payload and metadata together.

Every call of an op starts with a header all-to-all of the same shape on every rank, whatever the
op: each rank sends each peer the op, the group, its call number, a status (0, or the reason code
of an input it rejected) and the rows it will send that peer (and, where the handle says so, the
rows it expects back). So

- a rank that rejected its input still takes part (sending zero rows), raises InvalidArgument,
  and its peers raise CommError naming it and the reason (the text follows in one more small
  collective, on that path only) instead of waiting or pairing with its next call;
- ranks that called different ops, groups or calls raise CommError naming each other before any
  row moves, instead of crashing gloo with mismatched sizes;
- every wait is bounded by the group's timeout_s (see :mod:`ncclep.collectives`); a wait that
  expires or a peer that goes away breaks the group: its later calls raise CommError at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn

import torch
import torch.distributed as dist

from .. import collectives
from ..errors import (
    BROKEN,
    MISMATCH,
    PEER_LOST,
    PEER_REJECTED,
    REASON_OF_CODE,
    REJECT_REASONS,
    TIMEOUT,
    CommError,
    InvalidArgument,
)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """[n, ...] -> [n, nbytes] uint8 view of each row."""
    flat = t.reshape(t.shape[0], math.prod(t.shape[1:]))
    if flat.stride(-1) != 1:  # a size-1 or empty last dim may carry any stride; view() needs 1
        flat = flat.clone(memory_format=torch.contiguous_format)
    return flat.contiguous().view(torch.uint8)


def pack_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([as_bytes(p) for p in parts], dim=1)


def unpack_rows(
    rows: torch.Tensor, specs: Sequence[tuple[torch.dtype, tuple[int, ...]]]
) -> list[torch.Tensor]:
    """Inverse of pack_rows: specs give each part's dtype and per-row shape."""
    out = []
    offset = 0
    for dtype, shape in specs:
        count = 1
        for s in shape:
            count *= s
        width = count * torch.empty((), dtype=dtype).element_size()
        # a copy, not .contiguous(): a one-row slice is already contiguous but may start at an
        # offset that is not a multiple of dtype's size (e.g. after 1-byte UE8M0 scales)
        part = rows[:, offset : offset + width].clone(memory_format=torch.contiguous_format).view(dtype)
        out.append(part.reshape(rows.shape[0], *shape))
        offset += width
    return out


class Counts(NamedTuple):
    """Row counts per peer, on the host (for the all-to-all's splits) and on the device."""

    host: list[int]
    device: torch.Tensor


OPS = ("ll_dispatch", "ll_combine", "ht_dispatch", "ht_combine", "ht_dispatch_cached")
_OP_CODE = {op: i + 1 for i, op in enumerate(OPS)}
_OP_NAME = {code: op for op, code in _OP_CODE.items()}
STAGES = ("header", "rows", "reasons")
# header words, per destination
_OP, _GROUP, _CONFIG, _CALL, _STATUS, _SEND, _EXPECT = range(7)
_WORDS = 7
REASON_BYTES = 480


def _op_name(code: int) -> str:
    return _OP_NAME.get(code, f"op {code}")


@dataclass
class PendingRows:
    """An all-to-all in flight; ``wait()`` returns the received rows (bounded by timeout_s)."""

    recv: torch.Tensor
    work: Any
    exchange: Exchange | None = None
    op: str = ""
    call: int = 0
    error: CommError | None = None  # a failed wait fails every later one (the rows are not there)

    def wait(self) -> torch.Tensor:
        if self.error is not None:
            raise self.error
        if self.work is not None:
            if self.exchange is not None:
                try:
                    self.exchange.wait(self.work, self.op, self.call, 1)
                except CommError as err:
                    self.error = err
                    raise
            else:
                self.work.wait()
            self.work = None
        return self.recv


class Exchange:
    """The collectives of one reference group: header, rows and their deadlines.

    ``key`` is the group's identity, the same on every rank (agreed when the group was made);
    ``config_crc`` a checksum of its sizes. ``calls`` counts this group's calls (rejected ones
    too): ranks must make them in the same order.
    """

    def __init__(
        self,
        rank: int,
        world: int,
        group: dist.ProcessGroup | None,
        device: torch.device,
        timeout_s: float,
        key: int,
        config_crc: int,
    ) -> None:
        self.rank = rank
        self.world = world
        self.group = group
        self.device = device
        self.timeout_s = float(timeout_s)
        self.key = key
        self.config_crc = config_crc
        self.calls = 0
        self.broken: CommError | None = None
        self.signposts = collectives.Signposts(key, rank, world)

    # ------------------------------------------------------------------------- failures

    def _check_usable(self, op: str) -> None:
        if self.broken is not None:
            err = self.broken
            raise CommError(
                f"{op}: this group broke earlier ({err}); close it and open a new Group",
                phase=f"{op} header",
                rank=self.rank,
                peer=err.peer,
                reason=BROKEN,
            )

    def _break(self, err: CommError, call: int, stage: int) -> CommError:
        self.broken = err
        # peers still waiting in this group read it at their next step and leave too
        self.signposts.put(call, stage, "gave_up", err.peer, err.reason)
        return err

    def _missing_peer(self, call: int, stage: int, grace_s: float = 0.0) -> int:
        """The rank that did not come to (call, stage), when it can be told; else -1."""
        if self.world == 2:
            return 1 - self.rank
        deadline = time.monotonic() + grace_s
        while True:
            behind = self.signposts.behind(call, stage)
            if len(behind) <= 1 or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        return behind[0] if behind else -1

    def _on_slow(self, op: str, call: int, stage: int) -> Callable[[], None]:
        posted = False

        def check() -> None:
            nonlocal posted
            if not posted:
                self.signposts.put(call, stage, "wait")
                posted = True
            gave_up = self.signposts.gave_up()
            if gave_up is not None:
                raise gave_up

        return check

    def wait(self, work: Any, op: str, call: int, stage: int) -> None:
        """Wait for ``work`` (``stage`` of call ``call``), bounded; failures break the group."""
        try:
            collectives.wait(
                work,
                self.timeout_s,
                stepwise=self.device.type == "cpu",
                on_slow=self._on_slow(op, call, stage),
            )
        except (collectives.Expired, collectives.GaveUp, collectives.Failed) as exc:
            self._fail(exc, op, call, stage)

    def _fail(self, exc: Exception, op: str, call: int, stage: int) -> NoReturn:
        """Raise the CommError for a wait that ended in ``exc``, breaking the group."""
        phase = f"{op} {STAGES[stage]}"
        where = f"call {call} of this group"
        if isinstance(exc, collectives.GaveUp):
            # A peer left first. If it left before this rank got there (an earlier call or stage)
            # or blamed this rank, this rank is the late one: it waited for that peer. Otherwise
            # both waited for the same missing rank: report the peer's reason and whom it blamed.
            late = (exc.call, exc.stage) < (call, stage) or exc.blamed == self.rank
            peer = exc.peer if late else exc.blamed
            reason = BROKEN if late else exc.reason
            blame = "" if exc.blamed < 0 else f", because of rank {exc.blamed}"
            text = (
                f"rank {exc.peer} gave up on this group ({exc.reason} at its call {exc.call}{blame}) "
                f"while rank {self.rank} waited ({where})"
            )
        elif isinstance(exc, collectives.Expired) or (isinstance(exc, collectives.Failed) and exc.timed_out):
            peer = self._missing_peer(call, stage)
            reason = TIMEOUT
            who = f"rank {peer}" if peer >= 0 else "a peer"
            text = f"rank {self.rank} waited past the {self.timeout_s:g} s deadline for {who} ({where})"
        else:
            self.signposts.put(call, stage, "wait")  # for the other survivors' roll call
            peer = self._missing_peer(call, stage, grace_s=min(1.0, self.timeout_s / 4))
            reason = PEER_LOST
            who = f"rank {peer}" if peer >= 0 else "a peer"
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            text = f"rank {self.rank} lost its connection to {who} ({where}; torch.distributed said: {first})"
        err = CommError(
            f"{phase}: {text}; the group is broken",
            phase=phase,
            rank=self.rank,
            peer=peer,
            reason=reason,
        )
        raise self._break(err, call, stage) from None

    def _post(self, start: Callable[[], Any], op: str, call: int, stage: int) -> Any:
        try:
            return collectives.post(start)
        except collectives.Failed as failed:
            self._fail(failed, op, call, stage)

    # ------------------------------------------------------------------------- header

    def start(
        self,
        op: str,
        send_counts: Sequence[int],
        expect_counts: Sequence[int] | None = None,
        problem: InvalidArgument | None = None,
    ) -> tuple[int, Counts]:
        """The header of a call: returns (call number, rows each peer sends us).

        ``expect_counts`` (combine and cached dispatch: the handle knows them) are checked
        against what the peers announce. With ``problem`` this rank sends nothing and raises it
        once every peer has heard of it. One host sync.
        """
        self._check_usable(op)
        call = self.calls
        self.calls += 1
        status = 0 if problem is None else problem.code
        code = _OP_CODE[op]
        rows = [
            [
                code,
                self.key,
                self.config_crc,
                call,
                status,
                int(send_counts[d]),
                -1 if expect_counts is None else int(expect_counts[d]),
            ]
            for d in range(self.world)
        ]
        send = torch.tensor(rows, dtype=torch.int64, device=self.device)
        recv = torch.empty_like(send)
        work = self._post(
            lambda: dist.all_to_all_single(recv, send, group=self.group, async_op=True), op, call, 0
        )
        self.wait(work, op, call, 0)
        headers = recv.tolist()  # the call's one host sync
        self._check_same_call(op, call, headers)
        statuses = [h[_STATUS] for h in headers]
        if any(statuses):
            self._raise_rejected(op, call, statuses, problem)
        if expect_counts is not None:
            self._check_counts(op, call, headers, send_counts, expect_counts)
        return call, Counts([h[_SEND] for h in headers], recv[:, _SEND])

    def _check_same_call(self, op: str, call: int, headers: list[list[int]]) -> None:
        """Every rank must be in the same call of the same group; ranks that did not reject
        their input must also be in the same op. Decided from every rank's header, which every
        rank holds, so all ranks decide alike and stay paired."""
        ident = [(h[_GROUP], h[_CONFIG], h[_CALL]) for h in headers]
        ops = {h[_OP] for h in headers if h[_STATUS] == 0}
        if len(set(ident)) == 1 and len(ops) <= 1:
            return
        mine = headers[self.rank]

        def differs(h: list[int]) -> bool:
            same_call = (h[_GROUP], h[_CONFIG], h[_CALL]) == (mine[_GROUP], mine[_CONFIG], mine[_CALL])
            both_ok = h[_STATUS] == 0 and mine[_STATUS] == 0
            return not same_call or (both_ok and h[_OP] != mine[_OP])

        odd = [p for p, h in enumerate(headers) if differs(h)]
        if not odd and ops:  # this rank agrees with everyone it can be compared with: name the others
            odd = [p for p, h in enumerate(headers) if h[_STATUS] == 0 and h[_OP] != min(ops)]
        peer = odd[0] if odd else -1
        theirs = headers[peer] if peer >= 0 else mine
        if (theirs[_GROUP], theirs[_CONFIG]) != (mine[_GROUP], mine[_CONFIG]):
            what = "a call of another group (or of a group made with other arguments)"
        else:
            what = f"its {_op_name(theirs[_OP])} (call {theirs[_CALL]})"
        phase = f"{op} header"
        err = CommError(
            f"{phase}: rank {self.rank}'s {op} (call {call} of this group) met rank {peer}'s {what}: "
            "the ranks called ops in a different order; the group is broken",
            phase=phase,
            rank=self.rank,
            peer=peer,
            reason=MISMATCH,
        )
        raise self._break(err, call, 0)

    def _check_counts(
        self,
        op: str,
        call: int,
        headers: list[list[int]],
        send_counts: Sequence[int],
        expect_counts: Sequence[int],
    ) -> None:
        for p, h in enumerate(headers):
            theirs_expect = h[_EXPECT]
            if h[_SEND] == expect_counts[p] and (theirs_expect < 0 or theirs_expect == send_counts[p]):
                continue
            phase = f"{op} header"
            err = CommError(
                f"{phase}: rank {self.rank} and rank {p} disagree on the rows of this {op} (this rank "
                f"expects {expect_counts[p]} from it and sends {send_counts[p]}; it announces "
                f"{h[_SEND]} and expects {theirs_expect}): their handles come from different "
                "dispatches; the group is broken",
                phase=phase,
                rank=self.rank,
                peer=p,
                reason=MISMATCH,
            )
            raise self._break(err, call, 0)

    def _raise_rejected(
        self, op: str, call: int, statuses: list[int], problem: InvalidArgument | None
    ) -> NoReturn:
        """Some rank rejected its input: every rank gathers the reasons' text, then the rejecting
        ranks raise their InvalidArgument and the others CommError naming the first of them."""
        text = str(problem).encode()[:REASON_BYTES] if problem is not None else b""
        try:
            texts = collectives.all_gather_bytes(
                text,
                REASON_BYTES,
                self.group,
                self.device,
                self.timeout_s,
                on_slow=self._on_slow(op, call, 2),
            )
        except (collectives.Expired, collectives.GaveUp, collectives.Failed) as exc:
            try:
                self._fail(exc, op, call, 2)
            except CommError as err:
                if problem is None:
                    raise
                raise problem from err  # the group is broken now; this rank still reports its input
        if problem is not None:
            raise problem
        peer = next(p for p, s in enumerate(statuses) if s)
        reason = REASON_OF_CODE.get(statuses[peer], "bad_input")
        detail = texts[peer].decode(errors="replace")
        others = [p for p, s in enumerate(statuses) if s and p != peer]
        also = f" (rank(s) {others} too)" if others else ""
        raise CommError(
            f"{op}: rank {peer} rejected its input ({REJECT_REASONS[reason][1]}: "
            f"{detail or 'no detail'}){also}, so no rank moved any rows; the group stays usable",
            phase=f"{op} header",
            rank=self.rank,
            peer=peer,
            reason=PEER_REJECTED,
        )

    def reject(self, op: str, problem: InvalidArgument) -> NoReturn:
        """Take part in ``op``'s header with zero rows and ``problem``'s code, then raise it
        (also when the exchange itself failed: then chained to that CommError, the group broken)."""
        try:
            self.start(op, [0] * self.world, None, problem)
        except CommError as err:
            raise problem from err
        raise problem  # start() raises it; this line is for the type checker

    # ------------------------------------------------------------------------- rows

    def rows(
        self,
        op: str,
        call: int,
        send: torch.Tensor,
        send_counts: list[int],
        recv_counts: list[int],
    ) -> PendingRows:
        """Rows ``send`` (grouped by destination, ``send_counts`` each) to every rank; async."""
        width = send.shape[1]
        recv = torch.empty((sum(recv_counts), width), dtype=send.dtype, device=send.device)
        work = self._post(
            lambda: dist.all_to_all_single(
                recv.view(-1),
                send.reshape(-1),
                [c * width for c in recv_counts],
                [c * width for c in send_counts],
                group=self.group,
                async_op=True,
            ),
            op,
            call,
            1,
        )
        return PendingRows(recv, work, self, op, call)
