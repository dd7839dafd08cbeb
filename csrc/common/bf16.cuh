// Eight bf16 values in one 16-byte vector: fp32 accumulation and rounding back to bf16.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>

namespace ncclep {
namespace device {

// acc[i] += v[i] (bf16 to fp32 is exact: the bits shifted into the upper half).
__device__ __forceinline__ void addBf16x8(float (&acc)[8], const int4& v) {
  const uint32_t words[4] = {uint32_t(v.x), uint32_t(v.y), uint32_t(v.z), uint32_t(v.w)};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc[2 * i] += __uint_as_float(words[i] << 16);
    acc[2 * i + 1] += __uint_as_float(words[i] & 0xffff0000u);
  }
}

// acc[i] = fma(w, v[i], acc[i]).
__device__ __forceinline__ void fmaBf16x8(float (&acc)[8], const int4& v, float w) {
  const uint32_t words[4] = {uint32_t(v.x), uint32_t(v.y), uint32_t(v.z), uint32_t(v.w)};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc[2 * i] = fmaf(w, __uint_as_float(words[i] << 16), acc[2 * i]);
    acc[2 * i + 1] = fmaf(w, __uint_as_float(words[i] & 0xffff0000u), acc[2 * i + 1]);
  }
}

// Rounds to nearest even.
__device__ __forceinline__ int4 packBf16x8(const float (&acc)[8]) {
  uint32_t words[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
    words[i] = *reinterpret_cast<const uint32_t*>(&h);
  }
  return make_int4(int(words[0]), int(words[1]), int(words[2]), int(words[3]));
}

}  // namespace device
}  // namespace ncclep
