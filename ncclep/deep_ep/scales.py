"""Scale layouts of DeepEP's fp8 tensors, from and to ncclep's.

ncclep moves fp8 scales row-major, one per 128 channels, as fp32 or as ``torch.float8_e8m0fnu``
(one byte, a power of two). DeepEP returns LL scales column-major (token dimension innermost, for
TMA), and "UE8M0" scales packed four to an int32 word, lowest byte first.
"""

from __future__ import annotations

import torch

from .. import fp8
from ..errors import InvalidArgument

PACK = fp8.UE8M0_PER_WORD


def to_ncclep(x: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """DeepEP's HT fp8 scales for ``x [B, H]`` as ncclep takes them: ``[B, H/128]`` fp32 or UE8M0,
    contiguous; and whether they came packed (int32 ``[B, H/512]``), to return them the same way.

    Any layout is accepted (DeepEP reads scales through their strides); other shapes and dtypes
    raise :class:`ncclep.InvalidArgument` naming ``x_scales``.
    """
    tokens, hidden = x.shape
    blocks = hidden // fp8.BLOCK
    dtype = scales.dtype
    if dtype is torch.float32 or dtype is fp8.UE8M0_DTYPE:  # the common case first
        if scales.shape == (tokens, blocks):
            return scales.contiguous(), False
    elif dtype is torch.int32:
        if scales.shape != (tokens, blocks // PACK) or blocks % PACK:
            raise InvalidArgument(
                f"x_scales: packed UE8M0 scales must be int32 [{tokens}, {blocks // PACK}] (hidden a "
                f"multiple of {fp8.BLOCK * PACK}), got {scales.dtype} {tuple(scales.shape)}"
            )
        return fp8.unpack_ue8m0(scales), True
    raise InvalidArgument(
        f"x_scales must be float32 [{tokens}, {blocks}] (one scale per 128 channels) or packed "
        f"UE8M0 int32 [{tokens}, {blocks // PACK}]; got {scales.dtype} {tuple(scales.shape)}"
    )
