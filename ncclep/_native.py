"""The compiled extension, when this install has one."""

from __future__ import annotations

from types import ModuleType

import torch

_C: ModuleType | None
try:
    from . import _C  # type: ignore[attr-defined, no-redef]

    IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # pure-Python install, or built without CUDA
    _C = None
    IMPORT_ERROR = exc


def available() -> bool:
    return _C is not None


def module() -> ModuleType:
    if _C is None:
        raise RuntimeError(f"ncclep's CUDA extension is not available: {IMPORT_ERROR}")
    return _C


def has_kernels(mode: str) -> bool:
    """Whether the extension carries the dispatch/combine kernels of ``mode``."""
    return _C is not None and mode in getattr(_C, "KERNEL_MODES", ())


def limits() -> dict[str, int]:
    """The kernels' limits and defaults as the C library states them (empty without the extension)."""
    return dict(_C.limits()) if _C is not None else {}


def nccl_version() -> str | None:
    """The NCCL the extension runs on, as loaded at run time ("2.30.7"), or None without the
    extension. Not torch's ``torch.cuda.nccl.version()``: that is the NCCL torch was built with,
    which an ``LD_PRELOAD``-ed library does not change."""
    if _C is None:
        return None
    code = int(_C.nccl_version())
    return f"{code // 10000}.{code // 100 % 100}.{code % 100}"


def nccl_versions() -> dict[str, str | None]:
    """For a run's record on GPUs: ``nccl``, the NCCL ncclep's kernels run on (the extension's,
    loaded at run time; torch's where the extension is missing), and ``torch_nccl``, the one torch
    was built with, when it differs."""
    torch_nccl = ".".join(map(str, torch.cuda.nccl.version()))
    ours = nccl_version()
    if ours is None:
        return {"nccl": torch_nccl}
    return {"nccl": ours, "torch_nccl": torch_nccl if torch_nccl != ours else None}
