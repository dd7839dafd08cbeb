// The one device-side interface for moving bytes to a peer, used by the LL and the HT kernels:
// LSA stores for peers on our node, the network transport (`Net`) for the others.
//
//   target(peer, dst, stage[, lsaBases])      where a message bound for the peer's window at `dst`
//                                             is written: there itself, or our staging copy
//   put(peer, dst, stage, bytes, thread, n)   sends a staged message (nothing to do for LSA peers)
//   signal(peer, kind, value)                 adds `value` to our signal of `kind` at the peer
//   signalRelaxed(peer, kind, value)          the same for a signal that publishes nothing
//   wait(peer, kind, least, ...)              waits until the peer's signal of `kind` reaches `least`
//   read(peer, kind)                          the peer's signal of `kind` now
//
// Signal (kind, peer) is a monotonic uint64 counter that `peer` adds to: GIN signal
// kind * nRanks + peer, or for LSA peers and the emulated network that entry of the group's
// SignalTable in our window.
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

// uint64 [kinds][nRanks] at `offset` of every rank's window.
struct SignalTable {
  size_t offset;
  int nRanks;

  __device__ __forceinline__ int index(int kind, int peer) const { return kind * nRanks + peer; }
  __device__ __forceinline__ size_t counterAt(int kind, int peer) const {
    return offset + (size_t(kind) * size_t(nRanks) + size_t(peer)) * 8;
  }
};

template <class Net>
struct Peers {
  Net net;
  int rank;
  int nodeSize;   // ranks per (possibly virtual) node; nodes are contiguous rank ranges
  int nodeFirst;  // our node's first rank
  SignalTable signals;

  __device__ __forceinline__ bool viaNet(int peer) const {
    if constexpr (!Net::kCrossesNodes) return false;
    return unsigned(peer - nodeFirst) >= unsigned(nodeSize);
  }

  template <typename T>
  __device__ __forceinline__ T* target(int peer, size_t dstOffset, size_t stageOffset) const {
    if (viaNet(peer)) return reinterpret_cast<T*>(net.local + stageOffset);
    return net.lsa.template peerPtr<T>(peer, dstOffset);
  }

  // The same, with the window's base at each LSA peer loaded once beforehand (lsaBases[peer] =
  // net.lsa.peerBase(peer)): no load of the window's description on the way.
  template <typename T>
  __device__ __forceinline__ T* target(int peer, size_t dstOffset, size_t stageOffset, char* const* lsaBases) const {
    if (viaNet(peer)) return reinterpret_cast<T*>(net.local + stageOffset);
    return reinterpret_cast<T*>(lsaBases[peer] + dstOffset);
  }

  // The caller's group (threads [0, nThreads), each passing its index) wrote the message and
  // synchronised first.
  __device__ __forceinline__ void put(int peer, size_t dstOffset, size_t stageOffset, size_t bytes, int thread,
                                     int nThreads) const {
    if (viaNet(peer)) net.put(peer, dstOffset, stageOffset, bytes, thread, nThreads);
  }

  // A release add (LSA, emulation) or a signal on the GIN context of the puts it covers: after a
  // barrier it publishes what the caller's block stored and the puts the caller issued before.
  // Release is cumulative, so no fence of its own: a fence before it would be a second one.
  __device__ __forceinline__ void signal(int peer, int kind, uint64_t value) const {
    if (viaNet(peer)) net.signalAdd(peer, signals.index(kind, rank), signals.counterAt(kind, rank), value);
    else net.lsa.signalAdd(peer, signals.counterAt(kind, rank), value);
  }

  // For a signal that publishes no data (an acknowledgement: our reads of the peer's data returned,
  // so its next stores cannot change what we read): relaxed for LSA peers. A network signal stays
  // what signal() sends.
  __device__ __forceinline__ void signalRelaxed(int peer, int kind, uint64_t value) const {
    if (viaNet(peer)) net.signalAdd(peer, signals.index(kind, rank), signals.counterAt(kind, rank), value);
    else net.lsa.signalAddRelaxed(peer, signals.counterAt(kind, rank), value);
  }

  // Acquires the signal: what the peer published before adding to it is visible after a true.
  // `seen`, if given, receives the last value read (the one that ended the wait after a true).
  __device__ __forceinline__ bool wait(int peer, int kind, uint64_t least, uint64_t timeoutNs,
                                       const device::ErrorSink& err, int phase, uint64_t* seen = nullptr) const {
    const int signal = signals.index(kind, peer);
    const size_t counter = signals.counterAt(kind, peer);
    const bool remote = viaNet(peer);
    const uint64_t* word = reinterpret_cast<const uint64_t*>(net.local + counter);
    uint64_t value = 0;
    const bool ok = device::waitUntil<device::SignalBackoff>(
        [&] {
          value = remote ? net.readSignal(signal, counter) : device::loadAcquire(word);
          return value >= least;
        },
        timeoutNs, err, phase, peer, int32_t(least));
    if (seen != nullptr) *seen = value;
    return ok;
  }

  // Acquires the signal, as wait does.
  __device__ __forceinline__ uint64_t read(int peer, int kind) const {
    const size_t counter = signals.counterAt(kind, peer);
    if (viaNet(peer)) return net.readSignal(signals.index(kind, peer), counter);
    return device::loadAcquire(reinterpret_cast<const uint64_t*>(net.local + counter));
  }
};

// The peers of a kernel's parameters (LLCommon, HTCommon).
template <class Net, class Common>
__device__ __forceinline__ Peers<Net> makePeers(const Common& c, const SignalTable& signals) {
  return {Net::make(Lsa{c.window, c.lsaRankOffset}, c.local, &c.devComm), c.rank, c.nodeSize,
          c.rank - c.rank % c.nodeSize, signals};
}

}  // namespace transport
}  // namespace ncclep
