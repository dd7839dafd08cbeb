// One interface over every peer: LSA stores for peers on our node, the network transport (`Net`)
// for the others. Kernels write a message where `target` says, and call `ship` once it is
// complete; for LSA peers the message already is in place and `ship` does nothing.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/device_error.cuh"
#include "common/memory_order.cuh"
#include "common/spin_wait.cuh"
#include "transport/lsa.cuh"
#include "transport/net.cuh"

namespace ncclep {
namespace transport {

template <class Net>
struct Peers {
  Net net;
  int rank;
  int nodeSize;  // ranks per (possibly virtual) node; nodes are contiguous rank ranges

  __device__ __forceinline__ bool viaNet(int peer) const { return peer / nodeSize != rank / nodeSize; }

  // Where a message bound for `peer`'s window at dstOffset is written: the peer's window itself,
  // or our staging copy at stageOffset.
  template <typename T>
  __device__ __forceinline__ T* target(int peer, size_t dstOffset, size_t stageOffset) const {
    if (viaNet(peer)) return reinterpret_cast<T*>(net.local + stageOffset);
    return net.lsa.template peerPtr<T>(peer, dstOffset);
  }

  // Sends a staged message (the caller's group wrote it and synchronised first).
  __device__ __forceinline__ void ship(int peer, size_t dstOffset, size_t stageOffset, size_t bytes, int thread,
                                       int nThreads) const {
    if (viaNet(peer)) net.put(peer, dstOffset, stageOffset, bytes, thread, nThreads);
  }

  // Adds `value` to signal `signal` of `peer` (its window word at counterOffset for LSA and the
  // emulation), after a system fence that publishes what the caller's block stored before.
  __device__ __forceinline__ void signalAdd(int peer, int signal, size_t counterOffset, uint64_t value) const {
    if (viaNet(peer)) {
      net.signalAdd(peer, signal, counterOffset, value);
    } else {
      device::fenceSystem();
      net.lsa.signalAdd(peer, counterOffset, value);
    }
  }

  // Waits until our signal from `peer` reaches `least`.
  __device__ __forceinline__ bool waitSignal(int peer, int signal, size_t counterOffset, uint64_t least,
                                             uint64_t timeoutNs, const device::ErrorSink& err, int phase) const {
    const bool remote = viaNet(peer);
    const uint64_t* word = reinterpret_cast<const uint64_t*>(net.local + counterOffset);
    return device::waitUntil<device::SignalBackoff>(
        [&] { return (remote ? net.readSignal(signal, counterOffset) : device::loadAcquire(word)) >= least; },
        timeoutNs, err, phase, peer, int32_t(least));
  }
};

}  // namespace transport
}  // namespace ncclep
