from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dist_pool import DistPool

_pools: dict[int, DistPool] = {}


def pool(world_size: int) -> DistPool:
    if world_size not in _pools:
        _pools[world_size] = DistPool(world_size)
    return _pools[world_size]


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
