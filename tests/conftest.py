from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dist_pool import DistPool

_pools: dict[tuple[int, str], DistPool] = {}


def pool(world_size: int, backend: str = "gloo") -> DistPool:
    key = (world_size, backend)
    if key not in _pools:
        _pools[key] = DistPool(world_size, backend)
    return _pools[key]


def gpu_pool(world_size: int) -> DistPool:
    """An NCCL pool of ``world_size`` GPUs with the extension built; skips the test otherwise."""
    import torch

    import ncclep

    if not torch.cuda.is_available() or torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} CUDA GPUs")
    if not ncclep.cuda_extension_available():
        pytest.skip("needs the ncclep CUDA extension (pip install -e . on a CUDA host)")
    return pool(world_size, "nccl")


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
