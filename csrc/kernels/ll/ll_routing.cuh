// Reading and checking one token's top-k row, shared by the LL kernels.
#pragma once

#include <cstdint>

#include "common/device_error.cuh"
#include "kernels/ll/ll_params.h"

namespace ncclep {
namespace ll {

__device__ __forceinline__ int64_t loadExpert(const void* idx, int idx64, int64_t i) {
  return idx64 ? static_cast<const int64_t*>(idx)[i] : int64_t(static_cast<const int32_t*>(idx)[i]);
}

// Expert ids of token b, checked: out-of-range ids and repeats become -1 (so every rank still
// finishes the protocol) and are reported once through the error word when `report` is set.
__device__ __forceinline__ void loadTokenExperts(const void* idx, int idx64, int b, int topk, int numExperts,
                                                 int (&experts)[kLLMaxTopk], const device::ErrorSink& err, bool report,
                                                 int phase) {
#pragma unroll
  for (int k = 0; k < kLLMaxTopk; ++k) {
    int e = -1;
    if (k < topk) {
      const int64_t raw = loadExpert(idx, idx64, int64_t(b) * topk + k);
      if (raw < -1 || raw >= numExperts) {
        if (report) device::reportError(err, kDeviceBadExpert, phase, -1, int32_t(raw));
      } else {
        e = int(raw);
      }
    }
    experts[k] = e;
  }
#pragma unroll
  for (int k = 1; k < kLLMaxTopk; ++k) {
#pragma unroll
    for (int j = 0; j < k; ++j) {
      if (experts[k] >= 0 && experts[k] == experts[j]) {
        if (report) device::reportError(err, kDeviceDuplicateExpert, phase, -1, b);
        experts[k] = -1;
      }
    }
  }
}

}  // namespace ll
}  // namespace ncclep
