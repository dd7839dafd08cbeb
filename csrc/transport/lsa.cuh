// LSA transport: peers in our NVLink team, reached by loads and stores through the symmetric
// window (ncclGetLsaPointer), signals added with release semantics and read with acquire loads.
#pragma once

#include <cstddef>
#include <cstdint>

#include <nccl.h>
#include <nccl_device.h>

#include "common/device_error.cuh"
#include "common/memory_order.cuh"

namespace ncclep {
namespace transport {

struct Lsa {
  ncclWindow_t window;
  int lsaRankOffset;  // world rank - LSA rank of the first rank of our LSA team

  __device__ __forceinline__ char* peerBase(int peer) const {
    return static_cast<char*>(ncclGetLsaPointer(window, 0, peer - lsaRankOffset));
  }

  template <typename T>
  __device__ __forceinline__ T* peerPtr(int peer, size_t offset) const {
    return reinterpret_cast<T*>(peerBase(peer) + offset);
  }

  // Stores a word with release semantics (publishes this thread's earlier stores, and through a
  // preceding barrier and system fence, its block's).
  __device__ __forceinline__ void signal(int peer, size_t offset, uint64_t value) const {
    device::storeRelease(peerPtr<uint64_t>(peer, offset), value);
  }

  // Adds to a monotonic counter in the peer's window, with the same release semantics.
  __device__ __forceinline__ void signalAdd(int peer, size_t offset, uint64_t value) const {
    device::addRelease(peerPtr<uint64_t>(peer, offset), value);
  }

  // Waits until the word at `ptr` (ours or a peer's) has `epoch` in its upper 32 bits; returns the
  // word, or reports a timeout (phase, peer) and returns 0. Epochs start at 1, so 0 never matches.
  __device__ __forceinline__ uint64_t waitEpoch(const uint64_t* ptr, uint32_t epoch, uint64_t timeoutNs,
                                                const device::ErrorSink& err, int phase, int peer) const {
    uint64_t start = device::globalTimerNs();
    while (true) {
      uint64_t v = device::loadAcquire(ptr);
      if (uint32_t(v >> 32) == epoch) return v;
      if (device::hasError(err)) return 0;
      if (device::globalTimerNs() - start > timeoutNs) {
        device::reportError(err, kDeviceTimeout, phase, peer, int32_t(epoch));
        return 0;
      }
    }
  }

  // Waits until the counter at `ptr` reaches at least `target`.
  __device__ __forceinline__ bool waitAtLeast(const uint64_t* ptr, uint64_t target, uint64_t timeoutNs,
                                              const device::ErrorSink& err, int phase, int peer) const {
    return device::waitUntil([&] { return device::loadAcquire(ptr) >= target; }, timeoutNs, err, phase, peer,
                             int32_t(target));
  }
};

}  // namespace transport
}  // namespace ncclep
