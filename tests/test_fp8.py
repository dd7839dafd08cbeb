"""ncclep.fp8 against a scalar re-statement of its docstring's arithmetic (no torch casts inside)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ncclep import fp8

F32 = np.float32


def e4m3_byte(value: float) -> int:
    """Round an fp32 value with |value| <= 448 to e4m3fn (nearest, ties to even); its bit pattern."""
    sign = 0x80 if math.copysign(1.0, value) < 0 else 0
    mag = abs(value)
    assert mag <= 448.0
    if mag < 2.0**-6:  # subnormals: multiples of 2**-9 (and 2**-6 itself, the first normal)
        return sign | round(mag / 2.0**-9)  # Python's round() is round-half-even
    exponent = math.frexp(mag)[1] - 1  # mag = m * 2**exponent with 1 <= m < 2
    quantum = 2.0 ** (exponent - 3)
    q = round(mag / quantum) * quantum  # exact: mag is an fp32, quantum a power of two
    exponent = math.frexp(q)[1] - 1  # rounding may carry into the next binade
    mantissa = int(q / 2.0**exponent * 8) - 8
    return sign | ((exponent + 7) << 3) | mantissa


def scalar_quantize(x: torch.Tensor, ue8m0: bool) -> tuple[list[int], list[int]]:
    """(e4m3 bytes of every element, scale bits of every block: fp32 bit pattern or UE8M0 byte)."""
    values = x.float().reshape(-1, fp8.BLOCK).tolist()
    q_bytes: list[int] = []
    scale_bits: list[int] = []
    for block in values:
        amax = F32(max(max(abs(v) for v in block), F32(1e-4)))  # the floor is the fp32 of 1e-4
        ratio = F32(amax * F32(1.0 / 448.0))  # amax * fp32(1/448), rounded to fp32
        if ue8m0:
            mant, exp = math.frexp(float(ratio))  # ratio = mant * 2**exp, 0.5 <= mant < 1
            e = exp - 1 if mant == 0.5 else exp  # smallest e with ratio <= 2**e
            multiplier = F32(2.0**-e)
            scale_bits.append(e + 127)
        else:
            reciprocal = F32(F32(1.0) / amax)  # rcp(amax): the correctly rounded fp32 reciprocal
            multiplier = F32(reciprocal * F32(448.0))
            scale_bits.append(int(np.array([ratio], dtype=np.float32).view(np.uint32)[0]))
        for v in block:
            scaled = F32(F32(v) * multiplier)
            scaled = min(max(float(scaled), -448.0), 448.0)
            q_bytes.append(e4m3_byte(scaled))
    return q_bytes, scale_bits


def test_e4m3_rounding_helper_matches_known_values() -> None:
    assert e4m3_byte(448.0) == 0x7E
    assert e4m3_byte(-448.0) == 0xFE
    assert e4m3_byte(1.0) == 0x38
    assert e4m3_byte(2.0**-9) == 0x01
    assert e4m3_byte(2.0**-10) == 0x00  # tie rounds to even (zero)
    assert e4m3_byte(3 * 2.0**-10) == 0x02  # tie 1.5 quanta rounds to 2
    assert e4m3_byte(1.0625) == 0x38  # halfway between 1.0 and 1.125: even mantissa
    assert e4m3_byte(1.1875) == 0x3A  # halfway between 1.125 and 1.25: even mantissa
    assert e4m3_byte(15.5 * 2.0**-10) == 0x08  # rounds up into the first normal binade


def make_blocks(seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of 4 blocks each: ordinary, all-tiny (below the 1e-4 floor), huge, and mixed magnitudes."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(6):
        ordinary = torch.randn(fp8.BLOCK, generator=g) * float(torch.rand(1, generator=g) * 10 + 0.01)
        tiny = torch.randn(fp8.BLOCK, generator=g) * 1e-6
        huge = torch.randn(fp8.BLOCK, generator=g) * 3e4
        mixed = torch.randn(fp8.BLOCK, generator=g) * torch.logspace(-8, 8, fp8.BLOCK)
        rows.append(torch.cat([ordinary, tiny, huge, mixed]))
    x = torch.stack(rows).to(dtype)
    return torch.where(x == 0, torch.tensor(1e-7, dtype=dtype), x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("ue8m0", [False, True], ids=["fp32-scales", "ue8m0"])
def test_quantize_matches_scalar_loop(ue8m0: bool, dtype: torch.dtype) -> None:
    x = make_blocks(7 + ue8m0, dtype)
    q, scales = fp8.quantize(x, ue8m0)
    assert q.dtype == fp8.FP8_DTYPE and q.shape == x.shape
    assert scales.shape == (x.shape[0], x.shape[1] // fp8.BLOCK)
    assert scales.dtype == (fp8.UE8M0_DTYPE if ue8m0 else torch.float32)
    q_bytes, scale_bits = scalar_quantize(x, ue8m0)
    got_q = q.view(torch.uint8).reshape(-1).tolist()
    mismatches = [i for i, (a, b) in enumerate(zip(got_q, q_bytes, strict=True)) if a != b]
    assert not mismatches, f"{len(mismatches)} e4m3 values differ, first at {mismatches[:5]}"
    raw = scales.view(torch.uint8) if ue8m0 else scales.view(torch.int32)
    assert raw.reshape(-1).tolist() == scale_bits


def test_quantize_extremes() -> None:
    """An all-zero block (amax floored), a block at the bf16 max, a block exactly at 448."""
    x = torch.zeros(3, fp8.BLOCK, dtype=torch.float32)
    x[1] = torch.linspace(-1.0, 1.0, fp8.BLOCK) * 3.0e38
    x[2, 0], x[2, 1] = 448.0, -0.5
    for ue8m0 in (False, True):
        q, scales = fp8.quantize(x, ue8m0)
        q_bytes, scale_bits = scalar_quantize(x, ue8m0)
        assert q.view(torch.uint8).reshape(-1).tolist() == q_bytes
        raw = scales.view(torch.uint8) if ue8m0 else scales.view(torch.int32)
        assert raw.reshape(-1).tolist() == scale_bits
        assert bool((q[0].float() == 0).all())
        assert torch.isfinite(fp8.scales_to_float(scales)).all()


@pytest.mark.parametrize("ue8m0", [False, True], ids=["fp32-scales", "ue8m0"])
def test_round_trip_within_e4m3_precision(ue8m0: bool) -> None:
    x = make_blocks(11, torch.bfloat16).float()
    q, scales = fp8.quantize(x, ue8m0)
    back = fp8.dequantize(q, scales)
    assert back.dtype == torch.float32 and back.shape == x.shape
    s = fp8.scales_to_float(scales).repeat_interleave(fp8.BLOCK, dim=-1)
    # e4m3: 3 mantissa bits (relative step 2**-3, error <= 2**-4) down to 2**-6, then an absolute
    # step of 2**-9 in scaled units; a little slack for the fp32 rounding of the multiplier
    bound = (x.abs() * 2.0**-4 + s * 2.0**-10) * (1 + 1e-5)
    err = (back - x).abs()
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max()):.3g}"
    amax = x.reshape(x.shape[0], -1, fp8.BLOCK).abs().amax(-1)
    rel = float((back - x).norm() / x.norm())
    assert rel < 2.0**-4
    # the largest element of each (non-tiny) block keeps its magnitude within one e4m3 step
    big = amax > 1e-4
    peak = back.reshape(x.shape[0], -1, fp8.BLOCK).abs().amax(-1)
    assert torch.allclose(peak[big], amax[big], rtol=2.0**-3)


def test_ue8m0_scales_are_powers_of_two_covering_amax() -> None:
    x = make_blocks(13, torch.bfloat16)
    _, scales = fp8.quantize(x, ue8m0=True)
    s = fp8.scales_to_float(scales)
    exponents = torch.log2(s)
    assert torch.equal(exponents, exponents.round()), "UE8M0 scales must be powers of two"
    amax = x.float().reshape(x.shape[0], -1, fp8.BLOCK).abs().amax(-1).clamp_min(fp8.AMAX_FLOOR)
    ratio = amax * torch.tensor(1 / 448, dtype=torch.float32)  # the docstring's amax * fp32(1/448)
    assert bool((s >= ratio).all()), "scale must cover amax * fp32(1/448)"
    assert bool((s / 2 < ratio).all()), "the scale must be the smallest such power of two"
    # so scale * 448 covers amax, up to the rounding of fp32(1/448) and of the product
    assert bool((s.double() * 448 >= amax.double() * (1 - 2.0**-22)).all())
    # and nothing saturates beyond 448 after scaling
    q, _ = fp8.quantize(x, ue8m0=True)
    assert float(q.float().abs().max()) <= fp8.FP8_MAX


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_round_scale_is_ue8m0_in_fp32(dtype: torch.dtype) -> None:
    """round_scale: UE8M0's e4m3 values, and its scales as the fp32 ``2**e`` torch converts the
    bytes to (a block with an inf: the byte 255, which torch converts to NaN)."""
    x = make_blocks(17, dtype)
    x[0, 5] = float("inf")
    q, scales = fp8.quantize(x, round_scale=True)
    q_ue8m0, ue8m0 = fp8.quantize(x, ue8m0=True)
    assert scales.dtype == torch.float32 and scales.shape == ue8m0.shape
    assert torch.equal(q.view(torch.uint8), q_ue8m0.view(torch.uint8))
    assert torch.equal(scales.view(torch.int32), ue8m0.float().view(torch.int32))
    bits = scales.view(torch.int32)
    assert int(bits[0, 0]) == 0x7F800001  # torch's float of the UE8M0 byte 255
    finite = scales.isfinite()
    assert int(finite.sum()) == scales.numel() - 1
    assert bool((bits[finite] & 0x7FFFFF == 0).all()), "fp32 powers of two"
    _, scale_bits = scalar_quantize(x[1:], ue8m0=True)
    assert (bits[1:] >> 23).reshape(-1).tolist() == scale_bits


def test_quantize_rejects_hidden_not_multiple_of_128() -> None:
    with pytest.raises(ValueError, match="divisible by 128"):
        fp8.quantize(torch.randn(2, 200))


def test_ue8m0_packing_and_column_major_layout() -> None:
    x = torch.randn(3, 5, 512).to(torch.bfloat16)
    _, scales = fp8.quantize(x, ue8m0=True)  # [3, 5, 4] float8_e8m0fnu
    packed = fp8.pack_ue8m0(scales)
    assert packed.dtype == torch.int32 and packed.shape == (3, 5, 1)
    exponents = scales.view(torch.uint8).to(torch.int64)
    word = packed.to(torch.int64) & 0xFFFFFFFF
    expected = sum(exponents[..., k : k + 1] << (8 * k) for k in range(4))  # lowest byte first
    assert torch.equal(word, expected)
    assert torch.equal(fp8.unpack_ue8m0(packed).view(torch.uint8), scales.view(torch.uint8))
    laid = fp8.column_major(scales.float())
    assert torch.equal(laid, scales.float()) and laid.stride() == (20, 1, 5)
    with pytest.raises(ValueError, match="divisible by 512"):
        fp8.pack_ue8m0(scales[..., :3])
