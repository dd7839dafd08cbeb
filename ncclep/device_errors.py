"""What a kernel recorded in a group's error word, raised as the matching Python exception.

``comm.device_error()`` gives (code, phase, peer, value) with the code and phase named by the C
library: code "timeout", "bad_expert", "duplicate_expert", "peer_rejected" or "protocol". The op
calls of ``ncclep._C`` read the same word before launching and raise ``DeviceErrorPending`` with it
(:func:`recorded_error` turns it into the exception).
"""

from __future__ import annotations

from typing import Any, NoReturn

import torch

from .config import GroupConfig
from .errors import (
    BROKEN,
    DEVICE,
    PEER_REJECTED,
    REJECT_REASONS,
    TIMEOUT,
    CommError,
    InvalidArgument,
    NcclepError,
    reject_reason,
)


def raise_device_error(comm: Any, cfg: GroupConfig, rank: int, broke: list[CommError] | None = None) -> None:
    """Raise what a kernel of ``comm`` reported: bad input of an earlier call, a peer's rejection
    of one, or a timed-out wait. ``broke`` keeps the first report that broke the group (a timeout
    or a protocol error stays in the error word): later reads raise ``CommError(reason="broken")``."""
    err = comm.device_error()
    if err is not None:
        raise recorded_error(err, cfg, rank, broke)


def recorded_error(
    err: tuple[Any, ...], cfg: GroupConfig, rank: int, broke: list[CommError] | None = None
) -> NcclepError:
    """The exception for a recorded ``(code, phase, peer, value)`` (see :func:`raise_device_error`)."""
    code, where, peer, value = err
    if code == "bad_expert":
        return InvalidArgument(
            f"topk_idx of an earlier {where} held expert id {value}; ids must be -1 or in "
            f"[0, {cfg.num_experts}) (that call treated it as -1)",
            reason="expert_id",
        )
    if code == "duplicate_expert":
        return InvalidArgument(
            f"topk_idx row {value} of an earlier {where} named the same expert twice "
            "(that call kept the first)",
            reason="duplicate_expert",
        )
    if code == "peer_rejected":
        reason = reject_reason(value)
        what = REJECT_REASONS[reason][1] if reason in REJECT_REASONS else f"reason code {value}"
        return CommError(
            f"{where}: rank {peer} rejected its input of that call ({reason}: {what}); the outputs of "
            f"that call on rank {rank} lack rank {peer}'s part and must be discarded (this call did "
            "not take part: make it again); the group stays usable",
            phase=where,
            rank=rank,
            peer=peer,
            reason=PEER_REJECTED,
        )
    if broke:
        first = broke[0]
        return CommError(
            f"the group broke earlier ({first}): close it and open a new one",
            phase=first.phase,
            rank=rank,
            peer=first.peer,
            reason=BROKEN,
        )
    if code == "timeout":
        fatal = CommError(
            f"{where}: rank {rank} waited past the {cfg.timeout_s} s deadline for rank {peer}",
            phase=where,
            rank=rank,
            peer=peer,
            reason=TIMEOUT,
        )
    else:
        fatal = CommError(
            f"{where}: device error {code} (peer {peer}, value {value})",
            phase=where,
            rank=rank,
            peer=peer,
            reason=DEVICE,
        )
    if broke is not None:
        broke.append(fatal)
    return fatal


def reject_in_call(comm: Any, kernel: str, problem: InvalidArgument, backend: Any) -> NoReturn:
    """Takes part in ``kernel``'s call on the current stream with ``problem``'s reason and no
    payload (``comm.reject``), then raises ``problem``. ``backend.raise_device_error()`` first reads
    what an earlier call reported: bad input or a peer's rejection is chained to ``problem``; a
    broken group launches nothing."""
    earlier: NcclepError | None = None
    try:
        backend.raise_device_error()
    except InvalidArgument as err:
        earlier = err
    except CommError as err:
        if not err.group_usable:
            raise problem from err
        earlier = err
    try:
        comm.reject(kernel, problem.code, torch.cuda.current_stream(backend.device).cuda_stream)
    except RuntimeError as err:  # the group is failing (the C library refused the launch)
        raise problem from err
    raise problem from earlier
