// Network transports: the hop to a peer on another node. A message is first written into our own
// window (a staging area), then put into the peer's window; a signal added after the puts tells
// the peer they have landed. Two implementations with one interface (and NetNone, below, for a group
// with no peer off our node):
//
//   NetGin       NCCL GIN: ncclGin::put / signal on context 0; signals are GIN signals
//                (index = LL signal index), read with readSignal. Used when nLsaTeams > 1.
//   NetEmulated  the same calls carried over LSA (NCCLEP_VIRTUAL_NODES=n on one NVLink host):
//                put = the calling threads copy staging -> peer window, signal = a release add
//                to a counter in the peer's window. Lets the network code path run without NICs.
//
// Ordering contract (both): a signal to a peer is issued after every put to that peer it must
// cover, by the same thread or after an arrival that followed them: the threads that issued the
// puts add to a counter after a barrier (acq_rel), and the signalling thread observed the last
// addition (a grid-wide arrival, or the per-chunk arrival of the HT hierarchical path,
// ht_internode.cuh). GIN orders a signal after earlier puts on the same context; the emulation's
// signal is a release add, cumulative over what the signalling thread observed.
#pragma once

#include <cstddef>
#include <cstdint>

#include <nccl.h>
#include <nccl_device.h>

#include "common/memory_order.cuh"
#include "transport/lsa.cuh"

namespace ncclep {
namespace transport {

// Every peer is on our node: no network hop. Kernels built for it carry no staging code (the
// LSA-only common case; a launch picks it when the group's node spans all its ranks).
struct NetNone {
  static constexpr bool kCrossesNodes = false;
  Lsa lsa;
  char* local;

  __device__ __forceinline__ static NetNone make(const Lsa& lsa, char* local, const ncclDevComm* /*comm*/) {
    return {lsa, local};
  }
  __device__ __forceinline__ void put(int, size_t, size_t, size_t, int, int) const { __trap(); }
  __device__ __forceinline__ void signalAdd(int, int, size_t, uint64_t) const { __trap(); }
  __device__ __forceinline__ uint64_t readSignal(int, size_t) const {
    __trap();
    return 0;
  }
};

struct NetEmulated {
  static constexpr bool kCrossesNodes = true;
  Lsa lsa;
  char* local;  // our window's base

  __device__ __forceinline__ static NetEmulated make(const Lsa& lsa, char* local, const ncclDevComm* /*comm*/) {
    return {lsa, local};
  }

  // Copies `bytes` (a multiple of 16) from our window at srcOffset to the peer's at dstOffset;
  // threads [0, nThreads) of the caller's group each call it with their index.
  __device__ __forceinline__ void put(int peer, size_t dstOffset, size_t srcOffset, size_t bytes, int thread,
                                      int nThreads) const {
    const int4* src = reinterpret_cast<const int4*>(local + srcOffset);
    int4* dst = lsa.peerPtr<int4>(peer, dstOffset);
    for (size_t i = thread; i < bytes / 16; i += nThreads) dst[i] = src[i];
  }

  // `counterOffset`: the signal's word in the peer's window.
  __device__ __forceinline__ void signalAdd(int peer, int /*signal*/, size_t counterOffset, uint64_t value) const {
    lsa.signalAdd(peer, counterOffset, value);
  }

  __device__ __forceinline__ uint64_t readSignal(int /*signal*/, size_t counterOffset) const {
    return device::loadAcquire(reinterpret_cast<const uint64_t*>(local + counterOffset));
  }
};

struct NetGin {
  static constexpr bool kCrossesNodes = true;
  Lsa lsa;
  char* local;
  const ncclDevComm* comm;  // the group's ncclDevComm (kernel parameter space)

  __device__ __forceinline__ static NetGin make(const Lsa& lsa, char* local, const ncclDevComm* comm) {
    return {lsa, local, comm};
  }

  __device__ __forceinline__ void put(int peer, size_t dstOffset, size_t srcOffset, size_t bytes, int thread,
                                      int /*nThreads*/) const {
    if (thread != 0) return;
    ncclGin gin(*comm, 0);
    gin.put(ncclTeamWorld(*comm), peer, lsa.window, dstOffset, lsa.window, srcOffset, bytes);
  }

  __device__ __forceinline__ void signalAdd(int peer, int signal, size_t /*counterOffset*/, uint64_t value) const {
    ncclGin gin(*comm, 0);
    gin.signal(ncclTeamWorld(*comm), peer, ncclGin_SignalAdd{ncclGinSignal_t(signal), value});
  }

  __device__ __forceinline__ uint64_t readSignal(int signal, size_t /*counterOffset*/) const {
    ncclGin gin(*comm, 0);
    return gin.readSignal(ncclGinSignal_t(signal));
  }
};

}  // namespace transport
}  // namespace ncclep
