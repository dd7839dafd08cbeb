"""Bounded host-side collectives: every wait of ncclep's own torch.distributed traffic ends by a
deadline, and a slow wait leaves a signpost in the job's store so that peers can tell who is where.

torch.distributed collectives block until the process group's own timeout (30 minutes by default)
and a collective whose peers called something else can crash gloo. ncclep therefore posts every
collective asynchronously and waits for it in steps (``Work.wait(timeout=...)``), up to the
group's ``timeout_s``. A wait that expires leaves the collective behind, still posted: the process
group may pair it with a peer's later call, so after a timeout it must not carry ncclep traffic
again (see :class:`ncclep.CommError`).

Signposts: a rank whose wait has taken longer than a step writes ``(call, stage)`` under its rank
in the store of the default process group; a rank that gives up on a group writes that it did.
Waiting peers read them at each step, so they leave early when a peer gave up, and a rank that
times out can name the peer that never came. Good calls never touch the store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

_OUR_TIMEOUT = "Operation timed out"  # what Work.wait(timeout=...) raises while the work still runs


class Expired(Exception):
    """The deadline passed while the collective was still running."""


class Failed(Exception):
    """The collective failed (a peer closed its connection, the process group timed out...)."""

    @property
    def timed_out(self) -> bool:
        return "timed out" in str(self).lower() or "timeout" in str(self).lower()


class GaveUp(Exception):
    """A peer wrote that it gave up on the group while we waited: ``peer`` gave up, at its
    ``call`` and ``stage``, for ``reason`` (a CommError reason), blaming ``blamed`` (-1: nobody)."""

    def __init__(self, peer: int, call: int, stage: int, reason: str, blamed: int) -> None:
        super().__init__(f"rank {peer} gave up at its call {call} ({reason}, blaming rank {blamed})")
        self.peer = peer
        self.call = call
        self.stage = stage
        self.reason = reason
        self.blamed = blamed


def step_s(timeout_s: float) -> float:
    """How long one step of a wait lasts: the first signpost goes up after it."""
    return min(1.0, max(0.05, timeout_s / 8))


def wait(
    work: Any,
    timeout_s: float,
    *,
    stepwise: bool = True,
    on_slow: Callable[[], None] | None = None,
) -> None:
    """Wait for ``work`` at most ``timeout_s``; raises :class:`Expired` or :class:`Failed`.

    With ``stepwise`` (gloo: a wait that expires leaves the work running) ``on_slow`` runs after
    each step that did not finish it, and may raise to end the wait early.
    """
    deadline = time.monotonic() + timeout_s
    step = step_s(timeout_s) if stepwise else timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            work.wait(timeout=timedelta(seconds=max(min(step, left), 0.001)))
            return
        except RuntimeError as exc:
            if _OUR_TIMEOUT not in str(exc):
                raise Failed(str(exc)) from None
        if time.monotonic() >= deadline:
            raise Expired()
        if on_slow is not None:
            on_slow()


def post(start: Callable[[], Any]) -> Any:
    """Post a collective (``async_op=True``); a failure to post is :class:`Failed`."""
    try:
        return start()
    except RuntimeError as exc:
        raise Failed(str(exc)) from None


def all_gather_bytes(
    data: bytes, size: int, group: Any, device: torch.device, timeout_s: float, **kw: Any
) -> list[bytes]:
    """Every rank's ``data`` (at most ``size`` bytes; longer is cut), in rank order, bounded."""
    world = dist.get_world_size(group)
    mine = torch.zeros(size + 4, dtype=torch.uint8)
    data = data[:size]
    mine[:4] = torch.tensor(list(len(data).to_bytes(4, "little")), dtype=torch.uint8)
    if data:
        mine[4 : 4 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    mine = mine.to(device)
    out = [torch.empty_like(mine) for _ in range(world)]
    work = post(lambda: dist.all_gather(out, mine, group=group, async_op=True))
    wait(work, timeout_s, stepwise=device.type == "cpu", **kw)
    records = []
    for t in out:
        raw = bytes(t.cpu().tolist())
        n = int.from_bytes(raw[:4], "little")
        records.append(raw[4 : 4 + min(n, size)])
    return records


def all_gather_json(obj: Any, size: int, group: Any, device: torch.device, timeout_s: float) -> list[Any]:
    """Every rank's small JSON-able ``obj``, bounded (None for a record that does not parse)."""
    out = []
    for raw in all_gather_bytes(json.dumps(obj).encode(), size, group, device, timeout_s):
        try:
            out.append(json.loads(raw.decode()))
        except ValueError:
            out.append(None)
    return out


def _default_store() -> Any:
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # not initialised through a store (e.g. a fake process group)
        return None


class Signposts:
    """Where each rank of one group last waited, in the default process group's store.

    Keys ``ncclep/<group key>/<rank>``; values ``"<call> <stage> <state> <blamed> <reason>"``
    with state ``wait`` (still waiting there) or ``gave_up`` (for ``reason``, blaming rank
    ``blamed``, -1 when it could not tell). Every store call is best effort: a store that fails
    (its host died) turns the signposts off.
    """

    def __init__(self, key: int, rank: int, world: int) -> None:
        self.prefix = f"ncclep/{key:x}/"
        self.rank = rank
        self.world = world
        self.store = _default_store()

    def _key(self, rank: int) -> str:
        return f"{self.prefix}{rank}"

    def put(self, call: int, stage: int, state: str, blamed: int = -1, reason: str = "-") -> None:
        if self.store is None:
            return
        try:
            self.store.set(self._key(self.rank), f"{call} {stage} {state} {blamed} {reason}")
        except Exception:
            self.store = None

    def read(self, rank: int) -> tuple[int, int, str, int, str] | None:
        if self.store is None:
            return None
        try:
            key = self._key(rank)
            if not self.store.check([key]):
                return None
            call, stage, state, blamed, reason = self.store.get(key).decode().split()
            return int(call), int(stage), state, int(blamed), reason
        except Exception:
            self.store = None
            return None

    def others(self) -> dict[int, tuple[int, int, str, int, str] | None]:
        return {r: self.read(r) for r in range(self.world) if r != self.rank}

    def gave_up(self) -> GaveUp | None:
        """A peer that gave up on the group, or None."""
        for r, mark in self.others().items():
            if mark is not None and mark[2] == "gave_up":
                return GaveUp(r, mark[0], mark[1], mark[4], mark[3])
        return None

    def behind(self, call: int, stage: int) -> list[int]:
        """Peers with no signpost at (call, stage) or later: those that did not come, as far as
        the store knows (a peer that came less than a step ago has none yet)."""
        out = []
        for r, mark in self.others().items():
            if mark is None or (mark[0], mark[1]) < (call, stage):
                out.append(r)
        return out
