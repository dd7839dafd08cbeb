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

// Spins until `ready()` holds; false (after reporting a timeout with phase, peer, value) when the
// deadline passes first, or false at once when another thread of the group already failed.
// Backs off a little between polls so that spinning warps leave the SM to working ones.
template <typename Ready>
__device__ __forceinline__ bool waitUntil(Ready ready, uint64_t timeoutNs, const ErrorSink& err, int32_t phase,
                                          int32_t peer, int32_t value) {
  if (ready()) return true;
  uint64_t start = 0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  for (unsigned polls = 1;; ++polls) {
    if (ready()) return true;
    if (hasError(err)) return false;
    if (polls > 16) __nanosleep(32);
    uint64_t now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    if (now - start > timeoutNs) {
      reportError(err, kDeviceTimeout, phase, peer, value);
      return false;
    }
  }
}

}  // namespace device
}  // namespace ncclep
