// Reading one top-k entry (int32 or int64 ids), for the LL kernels.
#pragma once

#include <cstdint>

namespace ncclep {
namespace ll {

__device__ __forceinline__ int64_t loadExpert(const void* idx, int idx64, int64_t i) {
  return idx64 ? static_cast<const int64_t*>(idx)[i] : int64_t(static_cast<const int32_t*>(idx)[i]);
}

}  // namespace ll
}  // namespace ncclep
