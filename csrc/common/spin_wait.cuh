// The kernels' one spin wait: deadline-bounded, it records a timeout in the group's error word and
// returns instead of trapping or hanging.
#pragma once

#include <cstdint>

#include "common/device_error.cuh"
#include "common/memory_order.cuh"

namespace ncclep {
namespace device {

// How a wait backs off: after kSpinPolls polls back to back it sleeps kSleepNs between polls, so
// that spinning warps leave the SM's issue slots to working ones. The group's error word and the
// clock are read every kCheckEvery polls only: each load waits for the acquiring one before it, so
// reading them every time added a load's latency to every poll, and to the wait's end.
template <unsigned SpinPolls, unsigned SleepNs>
struct Backoff {
  static constexpr unsigned kSpinPolls = SpinPolls;
  static constexpr unsigned kSleepNs = SleepNs;
  static constexpr unsigned kCheckEvery = 8;
};
using SignalBackoff = Backoff<16, 32>;  // transport signals (transport::Peers::wait)
using FlagBackoff = Backoff<8, 64>;     // HT's message flags and peers' `done` words

// Spins until `ready()` holds; false (after reporting a timeout with phase, peer, value) when the
// deadline passes first, or false at once when another thread of the group already failed.
// `Policy`: a Backoff.
template <class Policy, typename Ready>
__device__ __forceinline__ bool waitUntil(Ready ready, uint64_t timeoutNs, const ErrorSink& err, int32_t phase,
                                          int32_t peer, int32_t value) {
  if (ready()) return true;
  const uint64_t start = globalTimerNs();
  for (unsigned polls = 1;; ++polls) {
    if (ready()) return true;
    if (polls > Policy::kSpinPolls) __nanosleep(Policy::kSleepNs);
    if (polls % Policy::kCheckEvery != 0) continue;
    if (hasError(err)) return false;
    if (globalTimerNs() - start > timeoutNs) {
      reportError(err, kDeviceTimeout, phase, peer, value);
      return false;
    }
  }
}

}  // namespace device
}  // namespace ncclep
