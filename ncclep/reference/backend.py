"""What the reference LL and HT backends share: the group's exchange and the rejection of a call."""

from __future__ import annotations

import zlib
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from ..config import GroupConfig
from ..errors import InvalidArgument
from .exchange import Exchange


class ReferenceBackend:
    def __init__(
        self,
        cfg: GroupConfig,
        rank: int,
        group: dist.ProcessGroup | None,
        device: torch.device | None = None,
        key: int = 0,
    ) -> None:
        self.cfg = cfg
        self.rank = rank
        self.group = group
        self.exchange = Exchange(
            rank,
            cfg.world_size,
            group,
            device or torch.device("cpu"),
            cfg.timeout_s,
            key,
            zlib.crc32(repr(cfg).encode()),
        )

    def reject(self, op: str, problem: InvalidArgument, **_call: Any) -> NoReturn:
        """Take part in ``op`` with no rows and ``problem``'s reason, then raise ``problem``: the
        peers raise CommError naming this rank for the same call."""
        self.exchange.reject(op, problem)
