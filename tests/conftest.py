from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dist_pool import DistPool

_pools: dict[tuple[int, str], DistPool] = {}

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def cpu_process_env(*paths: Path, **extra: str) -> dict[str, str]:
    """The environment of a CPU test's subprocess, the same on any host: the repository (and
    ``paths``) importable, one OpenMP thread, no launcher's variables, and no GPU visible (on a GPU
    host the default backend would be CUDA, and two processes on one GPU fail)."""
    env = {name: value for name, value in os.environ.items() if name not in LAUNCH_VARS}
    env.update(
        PYTHONPATH=os.pathsep.join(str(p) for p in (ROOT, *paths)),
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
    )
    env.update(extra)
    return env


# torchrun as this interpreter's module: no activated virtual environment needed
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def run_cpu_process(
    cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """``cmd`` as a CPU test's subprocess (in :func:`cpu_process_env` unless ``env``), output captured."""
    env = cpu_process_env() if env is None else env
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def pool(world_size: int, backend: str = "gloo") -> DistPool:
    key = (world_size, backend)
    if key not in _pools:
        _pools[key] = DistPool(world_size, backend)
    return _pools[key]


@contextlib.contextmanager
def virtual_nodes(nodes: int) -> Iterator[None]:
    """Split the host into ``nodes`` virtual nodes: peers on the other ones take the network path."""
    if nodes > 1:
        os.environ["NCCLEP_VIRTUAL_NODES"] = str(nodes)
    try:
        yield
    finally:
        os.environ.pop("NCCLEP_VIRTUAL_NODES", None)


def gpu_pool(world_size: int) -> DistPool:
    """An NCCL pool of ``world_size`` GPUs with the extension built; skips the test otherwise."""
    import torch

    import ncclep

    if not torch.cuda.is_available() or torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} CUDA GPUs")
    if not ncclep.cuda_extension_available():
        pytest.skip("needs the ncclep CUDA extension (pip install -e . on a CUDA host)")
    return pool(world_size, "nccl")


def peer_skips_a_call(group: Any, call: Callable[[], object]) -> str:
    """Worker side of the timeout tests: one complete ``call``, then rank 1 skips the next one;
    returns what rank 0 saw (``CommError peer=.. phase=..`` expected) or ``skipped`` on rank 1."""
    import torch.distributed as dist

    import ncclep

    call()
    group.check()
    if dist.get_rank() == 1:
        return "skipped"
    call()
    try:
        group.check()
    except ncclep.CommError as exc:
        return f"CommError peer={exc.peer} phase={exc.phase}"
    return "no error"


def run_isolated(world_size: int, worker: Callable[..., Any], *args: Any) -> list[Any]:
    """Runs ``worker`` on ``world_size`` GPUs in processes of their own (for workers that may leave
    a group broken); skips without the GPUs or the extension."""
    import torch

    import ncclep

    if torch.cuda.device_count() < world_size or not ncclep.cuda_extension_available():
        pytest.skip(f"needs {world_size} GPUs and the extension")
    isolated = DistPool(world_size, "nccl")
    try:
        return isolated.run(worker, *args)
    finally:
        isolated.close()


def assert_peer_timeout_reported(worker: Callable[[], str]) -> None:
    """Runs ``worker`` (which calls :func:`peer_skips_a_call`) on 2 GPUs in processes of its own
    (the group is left broken) and checks that rank 0 named rank 1."""
    import os

    results = run_isolated(2, worker)
    assert results[1] == "skipped"
    assert results[0].startswith("CommError peer=1"), results[0]
    assert os.environ.get("NCCLEP_VIRTUAL_NODES") is None


def peer_rejection(call: Callable[[], object], bad: int, reason: str, phase: str) -> str | None:
    """Worker side, on a peer of rank ``bad``, which rejected its arguments of the call just made
    (CUDA backend): once that call's kernels finished, the next call raises CommError naming
    ``bad``, the reason and the phase, without taking part. None, or what was wrong."""
    import torch

    import ncclep

    torch.cuda.synchronize()
    try:
        call()
    except ncclep.CommError as exc:
        if (exc.reason, exc.peer, exc.phase, exc.group_usable) != ("peer_rejected", bad, phase, True):
            return f"{phase}: CommError {exc.reason} peer={exc.peer} phase={exc.phase}: {exc}"
        if f"rank {bad} rejected its input" not in str(exc) or f"({reason}:" not in str(exc):
            return f"{phase}: the message does not say who and why: {exc}"
        return None
    return f"{phase}: no CommError on the call after a peer's rejection"


def own_rejection(call: Callable[[], object], reason: str) -> str | None:
    """Worker side, on the rank with bad arguments: ``call`` raises InvalidArgument(reason)."""
    import ncclep

    try:
        call()
    except ncclep.InvalidArgument as exc:
        return None if exc.reason == reason else f"InvalidArgument reason {exc.reason}, not {reason}"
    return "the bad call did not raise InvalidArgument"


@pytest.fixture(scope="session")
def world2() -> Iterator[DistPool]:
    yield pool(2)


@pytest.fixture(scope="session")
def world3() -> Iterator[DistPool]:
    yield pool(3)


@pytest.fixture(scope="session")
def world4() -> Iterator[DistPool]:
    yield pool(4)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for p in _pools.values():
        p.close()
    _pools.clear()
