"""Process-group plumbing: torchrun / mpirun environments and mpi4py communicators."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from .errors import InvalidArgument


def is_mpi_comm(obj: object) -> bool:
    """Duck-typed mpi4py communicator (anything with rank, size, bcast and allgather)."""
    return all(hasattr(obj, name) for name in ("Get_rank", "Get_size", "bcast", "allgather"))


def launcher() -> str | None:
    """'torchrun', 'mpirun' or None, from the environment this process was started in."""
    if "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        return "torchrun"
    if "OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_SIZE" in os.environ or "PMIX_RANK" in os.environ:
        return "mpirun"
    return None


def local_rank() -> int:
    for name in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _rendezvous_address() -> str:
    host = os.environ.get("MASTER_ADDR")
    if host is None:
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            host = "127.0.0.1"
    return f"{host}:{free_port()}"


def init_from_mpi(comm: Any, backend: str, timeout_s: float = 300.0) -> dist.ProcessGroup:
    """A torch.distributed group over the ranks of an mpi4py communicator.

    If torch.distributed is not initialised yet, it is initialised over ``comm`` (rank 0 picks a
    TCP rendezvous address and broadcasts it). Otherwise ``comm`` must span the whole world.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    if not dist.is_initialized():
        address = comm.bcast(_rendezvous_address() if rank == 0 else None, root=0)
        dist.init_process_group(
            backend,
            init_method=f"tcp://{address}",
            rank=rank,
            world_size=size,
            timeout=timedelta(seconds=timeout_s),
        )
        return dist.group.WORLD
    world_ranks = comm.allgather(dist.get_rank())
    if world_ranks != list(range(dist.get_world_size())):
        raise InvalidArgument(
            "the mpi4py communicator does not span torch.distributed's world in rank order; "
            "pass the matching torch.distributed process group instead",
            reason="option",
        )
    return dist.group.WORLD


def init_from_env(backend: str, timeout_s: float = 300.0) -> dist.ProcessGroup:
    """Initialise torch.distributed from a torchrun or mpirun environment."""
    kind = launcher()
    if kind == "torchrun":
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        return dist.group.WORLD
    if kind == "mpirun":
        from mpi4py import MPI

        return init_from_mpi(MPI.COMM_WORLD, backend, timeout_s)
    raise RuntimeError("not started by torchrun or mpirun")
