"""FP8 (e4m3) quantisation with one scale per 128 channels.

The arithmetic is spelled out step by step in fp32 so that the CUDA kernels can reproduce it
bit for bit (IEEE division, no fast-math):

* fp32 scales: ``amax = max(|x|, 1e-4)`` over the block, ``q = sat(x * (rcp(amax) * 448))``,
  ``scale = amax * fp32(1/448)``; dequantised value ``q * scale``. Reciprocal and products are
  each rounded to fp32: there is no division, because PyTorch itself evaluates ``c / t`` as
  ``reciprocal(t) * c`` and, on CUDA, ``t / c`` as ``t * (1/c)``.
* UE8M0 scales: ``scale = 2**e`` with ``e`` the smallest integer such that
  ``amax * fp32(1/448) <= 2**e``, found from the bits of that product (no ``log2``);
  ``q = sat(x * 2**-e)``. Scales are returned as ``torch.float8_e8m0fnu`` (one byte: the biased
  exponent).
* fp32 powers of two (``round_scale``): the same ``q`` and ``2**e`` as UE8M0, the scales as fp32,
  the values torch's ``float8_e8m0fnu -> float32`` conversion gives (DeepEP's ``round_scale``).
"""

from __future__ import annotations

import torch

from .errors import InvalidArgument

FP8_DTYPE = torch.float8_e4m3fn
UE8M0_DTYPE = torch.float8_e8m0fnu
FP8_MAX = 448.0
INV_FP8_MAX = 1.0 / 448.0  # rounded to fp32 where it multiplies an fp32 tensor
AMAX_FLOOR = 1e-4
BLOCK = 128


def _blocks(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % BLOCK:
        raise ValueError(f"fp8 needs a hidden size divisible by {BLOCK}, got {x.shape[-1]}")
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)


def _pow2_from_biased_exponent(biased: torch.Tensor) -> torch.Tensor:
    return (biased.to(torch.int32) << 23).view(torch.float32)


def quantize(
    x: torch.Tensor, ue8m0: bool = False, round_scale: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x [..., H]`` (H divisible by 128) to e4m3; returns ``(q [..., H], scales [..., H/128])``:
    fp32 scales, UE8M0 with ``ue8m0``, fp32 powers of two with ``round_scale`` alone."""
    blocks = _blocks(x)
    amax = blocks.abs().amax(dim=-1).clamp_min(AMAX_FLOOR)
    ratio = amax * INV_FP8_MAX
    if ue8m0 or round_scale:
        bits = ratio.view(torch.int32)
        biased = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
        multiplier = _pow2_from_biased_exponent(254 - biased)
        scales = biased.to(torch.uint8).view(UE8M0_DTYPE)
        if not ue8m0:
            scales = scales.float()
    else:
        multiplier = torch.reciprocal(amax) * FP8_MAX
        scales = ratio
    scaled = (blocks * multiplier.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX)
    q = scaled.to(FP8_DTYPE).reshape(x.shape)
    return q, scales


def scales_to_float(scales: torch.Tensor) -> torch.Tensor:
    """fp32 view of scales in either format."""
    if scales.dtype == UE8M0_DTYPE:
        return _pow2_from_biased_exponent(scales.view(torch.uint8))
    return scales.float()


def dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 values of ``q [..., H]`` with ``scales [..., H/128]``."""
    blocks = q.float().reshape(*q.shape[:-1], q.shape[-1] // BLOCK, BLOCK)
    return (blocks * scales_to_float(scales).unsqueeze(-1)).reshape(q.shape)


# ------------------------------------------------------------------ scale layouts for grouped GEMMs

UE8M0_PER_WORD = 4
"""UE8M0 exponents packed into one int32 word (lowest byte first), as DeepGEMM reads them."""


def pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """``float8_e8m0fnu [..., S]`` -> int32 ``[..., S/4]``, four exponents a word, lowest byte first."""
    if scales.shape[-1] % UE8M0_PER_WORD:
        raise InvalidArgument(
            f"packed UE8M0 scales need hidden divisible by {BLOCK * UE8M0_PER_WORD}, "
            f"got {scales.shape[-1] * BLOCK}",
            reason="hidden",
        )
    return scales.contiguous().view(torch.uint8).view(torch.int32)


def unpack_ue8m0(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[..., S/4]`` -> ``float8_e8m0fnu [..., S]`` (a view of a contiguous copy)."""
    return packed.contiguous().view(torch.uint8).view(UE8M0_DTYPE)


def column_major(scales: torch.Tensor) -> torch.Tensor:
    """The same values with the last two dimensions stored column-major (a device copy):
    ``[..., T, S]`` with strides ``(..., 1, T)``, the token dimension innermost, which grouped
    GEMMs read with TMA (DeepEP's LL scale layout)."""
    return scales.transpose(-1, -2).contiguous().transpose(-1, -2)
