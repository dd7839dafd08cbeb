"""What a kernel recorded in a group's error word, raised as the matching Python exception.

``comm.device_error()`` gives (code, phase, peer, value) with the code and phase named by the C
library: code "timeout", "bad_expert", "duplicate_expert" or "protocol". The op calls of
``ncclep._C`` read the same word before launching and raise ``DeviceErrorPending`` with it.
"""

from __future__ import annotations

from typing import Any

from .config import GroupConfig
from .errors import CommError, InvalidArgument, NcclepError


def raise_device_error(comm: Any, cfg: GroupConfig, rank: int) -> None:
    """Raise what a kernel of ``comm`` reported (bad input of an earlier call, or a timed-out wait)."""
    err = comm.device_error()
    if err is not None:
        raise recorded_error(err, cfg, rank)


def recorded_error(err: tuple[Any, ...], cfg: GroupConfig, rank: int) -> NcclepError:
    """The exception for a recorded ``(code, phase, peer, value)``."""
    code, where, peer, value = err
    if code == "bad_expert":
        return InvalidArgument(
            f"topk_idx of an earlier {where} held expert id {value}; ids must be -1 or in "
            f"[0, {cfg.num_experts}) (that call treated it as -1)"
        )
    if code == "duplicate_expert":
        return InvalidArgument(
            f"topk_idx row {value} of an earlier {where} named the same expert twice "
            "(that call kept the first)"
        )
    if code == "timeout":
        return CommError(
            f"{where}: rank {rank} waited past the {cfg.timeout_s} s deadline for rank {peer}",
            phase=where,
            rank=rank,
            peer=peer,
        )
    return CommError(f"{where}: device error {code} (peer {peer}, value {value})", phase=where, peer=peer)
