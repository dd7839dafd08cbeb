"""Tensors handed out before their values exist: what a ``return_recv_hook`` call returns.

DeepEP returns its receive buffers at once and fills them when the hook runs. ncclep's receive
half allocates (reference backend) or reveals (CUDA backend) the results only when it runs, so the
shim returns placeholders of the right shape and dtype, and the hook makes each one share its
result's storage (``Tensor.set_``: no copy). Before the hook a placeholder's values are
meaningless (all its elements alias one); views taken of it before the hook keep that alias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def placeholder(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of ``shape`` over a single element (all strides 0) until :func:`fulfil`."""
    return torch.empty_strided(shape, (0,) * len(shape), dtype=dtype, device=device)


def fulfil(target: torch.Tensor, value: torch.Tensor) -> None:
    """Make ``target`` the tensor ``value`` (same storage, offset, shape and strides)."""
    if target.dtype != value.dtype or target.shape != value.shape:
        raise RuntimeError(
            f"deferred tensor {target.dtype}{tuple(target.shape)} "
            f"cannot take {value.dtype}{tuple(value.shape)}"
        )
    target.set_(value)
