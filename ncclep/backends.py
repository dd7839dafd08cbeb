"""Which backend serves a group: the one place that decides, and says why when it is not CUDA."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from . import _native
from .config import GroupConfig
from .cuda_ht import CudaHT
from .cuda_ll import CudaLL
from .errors import FallbackWarning, NcclepError
from .reference import ReferenceHT, ReferenceLL

BACKENDS = ("auto", "reference", "cuda")

_warned: set[str] = set()


def cuda_gap(cfg: GroupConfig, device: torch.device, comm: Any) -> str | None:
    """Why ncclep's CUDA kernels cannot serve this group, or None. The C library decides
    (``ncclepGroupQueryKernelSupport``); this adds what only Python can see."""
    if device.type != "cuda":
        return "the group is not on CUDA devices (its process group is not NCCL)"
    if not _native.available():
        return (
            f"ncclep was installed without its CUDA extension ({_native.IMPORT_ERROR}); install it on a "
            "machine with CUDA torch and nvcc: pip install -e . --no-build-isolation"
        )
    if comm is None:
        return "the CUDA extension did not open a communicator for this group"
    return comm.kernel_support()


def choose(requested: str, cfg: GroupConfig, device: torch.device, comm: Any) -> tuple[str, str | None]:
    """(backend, reason): ``reason`` says why the reference backend serves the group (None on CUDA).

    ``backend="cuda"`` raises with the reason; ``"auto"`` falls back with a warning (once per
    process and reason) when the group is on CUDA devices.
    """
    if requested == "reference":
        return "reference", "backend='reference' was requested"
    gap = cuda_gap(cfg, device, comm)
    if gap is None:
        return "cuda", None
    if requested == "cuda":
        raise NcclepError(f"backend='cuda' is not available: {gap}")
    if device.type == "cuda" and gap not in _warned:
        _warned.add(gap)
        warnings.warn(
            f"ncclep: the {cfg.mode.upper()} group runs on the reference backend (pure PyTorch, several "
            f"times slower): {gap}",
            FallbackWarning,
            stacklevel=4,
        )
    return "reference", gap


def build(
    name: str,
    cfg: GroupConfig,
    rank: int,
    process_group: Any,
    comm: Any,
    device: torch.device | None = None,
    key: int = 0,
) -> Any:
    """The backend object of the group's mode. ``key`` identifies the group, the same on every
    rank (the reference backend's exchanges carry it)."""
    if name == "cuda":
        return CudaLL(cfg, rank, comm, device) if cfg.mode == "ll" else CudaHT(cfg, rank, comm, device)
    if cfg.mode == "ll":
        return ReferenceLL(cfg, rank, process_group, device, key)
    return ReferenceHT(cfg, rank, process_group, device, key)
