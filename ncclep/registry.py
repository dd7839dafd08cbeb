"""Open groups by id. The ops carry a group as its integer id and find its backend here."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from .config import GroupConfig
from .errors import NcclepError
from .validate import Checks


@dataclass(frozen=True)
class Entry:
    group: Any  # the ncclep.Group
    config: GroupConfig
    backend: Any  # the group's mode's backend: ReferenceLL, CudaLL, ReferenceHT or CudaHT
    checks: Checks  # the argument checks of the group's ops


_entries: dict[int, Entry] = {}
_lock = threading.Lock()


def add(group_id: int, entry: Entry) -> None:
    with _lock:
        _entries[group_id] = entry


def remove(group_id: int) -> None:
    with _lock:
        _entries.pop(group_id, None)


def contains(group_id: int) -> bool:
    return group_id in _entries


def lookup(group_id: int) -> Entry:
    try:
        return _entries[group_id]
    except KeyError:
        raise NcclepError(f"no open ncclep group has id {group_id}") from None
