"""GPU bring-up of the C API through ncclep._C: communicator, symmetric window, device
communicator, and LSA stores checked by a kernel (ncclepGroupCheckLsa).

Each case spawns one process per GPU. Nothing here runs at import time beyond imports:
the spawned children import this module to find their target.
"""

from __future__ import annotations

import os
import queue
import time
import traceback
from typing import Any

import pytest

pytestmark = pytest.mark.gpu

_TIMEOUT_S = 240.0
_CONFIG = dict(mode=0, num_experts=256, max_tokens_per_rank=128, hidden=7168, max_topk=8, num_sms=0)


def _extension():
    try:
        from ncclep import _C
    except Exception as exc:  # not built (pure-Python install) or broken
        pytest.skip(f"ncclep._C is not importable: {exc}")
    return _C


def _require_gpus(n: int):
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} CUDA GPUs")
    return _extension()


def _share_unique_id(_C, rank: int, world: int, id_queue) -> bytes:
    if rank == 0:
        uid = _C.get_unique_id()
        for _ in range(world - 1):
            id_queue.put(uid)
        return uid
    return id_queue.get(timeout=_TIMEOUT_S)


def _child(target, rank: int, world: int, id_queue, result_queue) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # multicast must stay off on our hosts
    try:
        import torch

        torch.cuda.set_device(rank)
        from ncclep import _C

        uid = _share_unique_id(_C, rank, world, id_queue)
        result_queue.put((rank, None, target(_C, uid, rank, world)))
    except BaseException:
        result_queue.put((rank, traceback.format_exc(), None))


def _bringup(_C, uid: bytes, rank: int, world: int) -> dict[str, Any]:
    import torch

    comm = _C.Communicator(uid, world, rank, rank, timeout_s=100.0, **_CONFIG)
    try:
        info = dict(comm.info())
        checks, errors = [], []
        for _ in range(3):
            checks.append(comm.check_lsa())
            errors.append(_C.last_error() if not checks[-1] else "")
        side = torch.cuda.Stream()
        checks.append(comm.check_lsa(side.cuda_stream))
        errors.append(_C.last_error() if not checks[-1] else "")
        api_error = comm.device_api_error
    finally:
        comm.close()
    comm.close()  # idempotent
    return {"info": info, "checks": checks, "errors": errors, "device_api_error": api_error}


def _lonely_check(_C, uid: bytes, rank: int, world: int) -> dict[str, Any]:
    """Only rank 0 runs the check: its barrier never completes and the host deadline fires."""
    comm = _C.Communicator(uid, world, rank, rank, timeout_s=5.0, **_CONFIG)
    out: dict[str, Any] = {"first": None, "second": None}
    if rank == 0:
        for key in ("first", "second"):
            try:
                comm.check_lsa()
            except RuntimeError as exc:
                out[key] = str(exc)
        comm.close()  # a timed-out group is released without touching the device
    else:
        # Keep this rank's communicator alive: its collective teardown would wait for rank 0.
        _keep_alive.append(comm)
    return out


_keep_alive: list[Any] = []


def _run(world: int, target) -> dict[int, Any]:
    """Runs target in `world` spawned processes; fails the test on any error, death or hang."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    id_queue, result_queue = ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(target=_child, args=(target, rank, world, id_queue, result_queue), daemon=True)
        for rank in range(world)
    ]
    for p in procs:
        p.start()

    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + _TIMEOUT_S
    while len(results) < world and not errors and time.monotonic() < deadline:
        try:
            rank, err, payload = result_queue.get(timeout=1.0)
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode not in (None, 0)]
            if dead:
                time.sleep(1.0)  # a child may have reported just before dying
                while True:
                    try:
                        rank, err, payload = result_queue.get_nowait()
                    except queue.Empty:
                        break
                    if err:
                        errors.append(f"rank {rank} raised:\n{err}")
                    else:
                        results[rank] = payload
                errors += [
                    f"rank {r} died with exit code {procs[r].exitcode}" for r in dead if r not in results
                ]
            continue
        if err:
            errors.append(f"rank {rank} raised:\n{err}")  # peers may now hang in a collective
        else:
            results[rank] = payload

    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()) if not errors else 5.0)
    killed = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in killed:
        procs[r].kill()
        procs[r].join(10.0)

    if errors:
        pytest.fail("\n".join(errors) + (f"\n(killed ranks {killed})" if killed else ""))
    missing = sorted(set(range(world)) - set(results))
    if missing:
        pytest.fail(f"ranks {missing} reported nothing within {_TIMEOUT_S:.0f} s; killed ranks {killed}")
    if killed:
        pytest.fail(f"ranks {killed} reported but did not exit within {_TIMEOUT_S:.0f} s (killed)")
    return results


@pytest.mark.parametrize("world", [2, 4, 8])
def test_lsa_bringup(world: int) -> None:
    _C = _require_gpus(world)
    results = _run(world, _bringup)
    for rank in range(world):
        r = results[rank]
        info = r["info"]
        assert info["device_api"], f"rank {rank}: device API unavailable: {r['device_api_error']}"
        assert r["device_api_error"] is None
        assert info["rank"] == rank and info["world_size"] == world and info["cuda_device"] == rank
        assert info["lsa_size"] == world, info
        assert info["lsa_rank"] == rank, info
        assert info["n_lsa_teams"] == 1, info
        assert info["gin"] is False, info  # single node: GIN must not be requested
        assert info["window_bytes"] == _C.window_bytes(
            _CONFIG["mode"],
            _CONFIG["num_experts"],
            _CONFIG["max_tokens_per_rank"],
            _CONFIG["hidden"],
            _CONFIG["max_topk"],
            world,
        )
        assert info["nccl_version"] == _C.nccl_version()
        assert r["checks"] == [True] * 4, f"rank {rank}: {r['errors']}"


def test_lsa_check_times_out_without_peers() -> None:
    _require_gpus(2)
    results = _run(2, _lonely_check)
    first, second = results[0]["first"], results[0]["second"]
    assert first is not None and "did not finish" in first, first
    assert second is not None and "timed out earlier" in second, second


def test_extension_basics_and_config_errors() -> None:
    _C = _extension()
    assert _C.version() == "0.1.0"
    assert _C.nccl_version() >= 22800
    assert len(_C.get_unique_id()) == 128
    # 2 parities x 4 ranks x 128 tokens x (14336 + 112 bytes dispatch + 14336 combine + 32 combine
    # weights), once for receiving and once for staging network puts, + counts, signals and 64 KiB,
    # in 2 MiB units
    messages = 2 * 4 * 128 * (14336 + 112 + 14336 + 32) * 2
    assert _C.window_bytes(0, 256, 128, 7168, 8, 4) == ((64 << 10) + messages + (2 << 20) - 1) // (
        2 << 20
    ) * (2 << 20)
    bad = [
        ((0, 256, 128, 7001, 8, 4), "hidden"),
        ((2, 256, 128, 7168, 8, 4), "mode"),
        ((0, 255, 128, 7168, 8, 4), "numExperts"),
        ((0, 256, 0, 7168, 8, 4), "maxTokensPerRank"),
        ((0, 256, 128, 7168, 0, 4), "maxTopk"),
        ((0, 256, 128, 7168, 8, 0), "nRanks"),
    ]
    for args, field in bad:
        with pytest.raises(RuntimeError, match=field):
            _C.window_bytes(*args)
    uid = _C.get_unique_id()
    with pytest.raises(ValueError):
        _C.Communicator(b"short", 2, 0, 0, timeout_s=100.0, **_CONFIG)
    with pytest.raises(RuntimeError, match="timeoutSeconds"):
        _C.Communicator(uid, 2, 0, 0, timeout_s=0.0, **_CONFIG)
    with pytest.raises(RuntimeError, match="rank"):
        _C.Communicator(uid, 2, 2, 0, timeout_s=100.0, **_CONFIG)
    with pytest.raises(RuntimeError, match="windowBytes"):
        _C.Communicator(uid, 2, 0, 0, timeout_s=100.0, window_bytes=4096, **_CONFIG)
