// LSA transport: peers in our NVLink team, reached by loads and stores through the symmetric
// window (ncclGetLsaPointer), signals stored or added with release semantics (waits: Peers).
#pragma once

#include <cstddef>
#include <cstdint>

#include <nccl.h>
#include <nccl_device.h>

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

  // Stores a word with release semantics: it publishes this thread's earlier stores and, release
  // being cumulative, those of every thread it synchronised with first (its block, after a barrier).
  __device__ __forceinline__ void signal(int peer, size_t offset, uint64_t value) const {
    device::storeRelease(peerPtr<uint64_t>(peer, offset), value);
  }

  // Adds to a monotonic counter in the peer's window, with the same release semantics.
  __device__ __forceinline__ void signalAdd(int peer, size_t offset, uint64_t value) const {
    device::addRelease(peerPtr<uint64_t>(peer, offset), value);
  }

  // The same add, relaxed: it publishes nothing.
  __device__ __forceinline__ void signalAddRelaxed(int peer, size_t offset, uint64_t value) const {
    device::addRelaxed(peerPtr<uint64_t>(peer, offset), value);
  }
};

}  // namespace transport
}  // namespace ncclep
