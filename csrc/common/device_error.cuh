#pragma once

#include "common/device_error.h"

namespace ncclep {
namespace device {

// Where a kernel reports: the host-visible word, and a device-memory abort flag that spinning
// waiters poll cheaply.
struct ErrorSink {
  DeviceError* word;
  uint32_t* aborted;
};

// First error wins; later ones are dropped so the host sees the root cause.
__device__ __forceinline__ void reportError(const ErrorSink& sink, int32_t code, int32_t phase, int32_t peer,
                                            int32_t value) {
  // Bad input does not stop the protocol (the offending ids are dropped); failed waits do.
  if (code == kDeviceTimeout || code == kDeviceProtocol) atomicExch(sink.aborted, 1u);
  DeviceError* err = sink.word;
  if (atomicCAS_system(&err->code, 0, -1) == 0) {
    err->phase = phase;
    err->peer = peer;
    err->value = value;
    __threadfence_system();
    atomicExch_system(&err->code, code);
  }
}

__device__ __forceinline__ bool hasError(const ErrorSink& sink) {
  return *reinterpret_cast<const volatile uint32_t*>(sink.aborted) != 0;
}

}  // namespace device
}  // namespace ncclep
