#pragma once

#include "common/device_error.h"

namespace ncclep {
namespace device {

// First error wins; later ones are dropped so the host sees the root cause.
__device__ __forceinline__ void reportError(DeviceError* err, int32_t code, int32_t phase, int32_t peer,
                                            int32_t value) {
  if (atomicCAS_system(&err->code, 0, -1) == 0) {
    err->phase = phase;
    err->peer = peer;
    err->value = value;
    __threadfence_system();
    atomicExch_system(&err->code, code);
  }
}

__device__ __forceinline__ bool hasError(const DeviceError* err) {
  return *reinterpret_cast<const volatile int32_t*>(&err->code) != 0;
}

}  // namespace device
}  // namespace ncclep
