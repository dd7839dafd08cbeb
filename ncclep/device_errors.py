"""What a kernel recorded in a group's error word, raised as the matching Python exception.

``comm.device_error()`` gives (code, phase, peer, value) with the code and phase named by the C
library: code "timeout", "bad_expert", "duplicate_expert" or "protocol".
"""

from __future__ import annotations

from typing import Any

from .config import GroupConfig
from .errors import DEVICE, TIMEOUT, CommError, InvalidArgument


def raise_device_error(comm: Any, cfg: GroupConfig, rank: int) -> None:
    """Raise what a kernel of ``comm`` reported (bad input of an earlier call, or a timed-out wait)."""
    err = comm.device_error()
    if err is None:
        return
    code, where, peer, value = err
    if code == "bad_expert":
        raise InvalidArgument(
            f"topk_idx of an earlier {where} held expert id {value}; ids must be -1 or in "
            f"[0, {cfg.num_experts}) (that call treated it as -1)",
            reason="expert_id",
        )
    if code == "duplicate_expert":
        raise InvalidArgument(
            f"topk_idx row {value} of an earlier {where} named the same expert twice "
            "(that call kept the first)",
            reason="duplicate_expert",
        )
    if code == "timeout":
        raise CommError(
            f"{where}: rank {rank} waited past the {cfg.timeout_s} s deadline for rank {peer}",
            phase=where,
            rank=rank,
            peer=peer,
            reason=TIMEOUT,
        )
    raise CommError(
        f"{where}: device error {code} (peer {peer}, value {value})",
        phase=where,
        rank=rank,
        peer=peer,
        reason=DEVICE,
    )
