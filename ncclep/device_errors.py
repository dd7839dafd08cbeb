"""What a kernel recorded in a group's error word, raised as the matching Python exception.

The word holds (code, phase, peer, value); codes and phases are those of ``csrc/common/device_error.h``.
"""

from __future__ import annotations

from typing import Any

from .config import GroupConfig
from .errors import CommError, InvalidArgument

ERROR_TIMEOUT, ERROR_BAD_EXPERT, ERROR_DUPLICATE_EXPERT = 1, 2, 3
PHASE_NAMES = {
    1: "ll_dispatch send",
    2: "ll_dispatch receive",
    3: "ll_combine send",
    4: "ll_combine receive",
    5: "ht_dispatch layout",
    6: "ht_dispatch send",
    7: "ht_dispatch receive",
    8: "ht_combine send",
    9: "ht_combine receive",
    10: "ht_dispatch_cached send",
    11: "ht_dispatch_cached receive",
    12: "ht forward (hierarchical path)",
}


def raise_device_error(comm: Any, cfg: GroupConfig, rank: int) -> None:
    """Raise what a kernel of ``comm`` reported (bad input of an earlier call, or a timed-out wait)."""
    err = comm.device_error()
    if err is None:
        return
    code, phase, peer, value = err
    where = PHASE_NAMES.get(phase, f"phase {phase}")
    if code == ERROR_BAD_EXPERT:
        raise InvalidArgument(
            f"topk_idx of an earlier {where} held expert id {value}; ids must be -1 or in "
            f"[0, {cfg.num_experts}) (that call treated it as -1)"
        )
    if code == ERROR_DUPLICATE_EXPERT:
        raise InvalidArgument(
            f"topk_idx row {value} of an earlier {where} named the same expert twice "
            "(that call kept the first)"
        )
    if code == ERROR_TIMEOUT:
        raise CommError(
            f"{where}: rank {rank} waited past the {cfg.timeout_s} s deadline for rank {peer}",
            phase=where,
            rank=rank,
            peer=peer,
        )
    raise CommError(f"{where}: device error code {code} (peer {peer}, value {value})", phase=where, peer=peer)
