// Device helpers shared by the LL kernels: the transport for a group's peers, and message lookup.
#pragma once

#include "kernels/ll/ll_params.h"
#include "transport/peers.cuh"

namespace ncclep {
namespace ll {

template <class Net>
__device__ __forceinline__ transport::Peers<Net> makePeers(const LLCommon& c);

template <>
__device__ __forceinline__ transport::Peers<transport::NetEmulated> makePeers(const LLCommon& c) {
  return {{{c.window, c.lsaRankOffset}, c.local}, c.rank, c.nodeSize};
}

template <>
__device__ __forceinline__ transport::Peers<transport::NetGin> makePeers(const LLCommon& c) {
  return {{{c.window, c.lsaRankOffset}, c.local, &c.devComm}, c.rank, c.nodeSize};
}

// Adds `value` to our signal of `kind` at `peer`.
template <class Net>
__device__ __forceinline__ void signalPeer(const transport::Peers<Net>& peers, const LLCommon& c, int peer, int kind,
                                           uint64_t value) {
  peers.signalAdd(peer, kind * c.nRanks + c.rank, c.layout.signal(kind, c.rank), value);
}

// Waits until `peer`'s signal of `kind` (in our window) reaches `least`.
template <class Net>
__device__ __forceinline__ bool waitPeer(const transport::Peers<Net>& peers, const LLCommon& c, int peer, int kind,
                                         uint64_t least, const device::ErrorSink& err, int phase) {
  return peers.waitSignal(peer, kind * c.nRanks + peer, c.layout.signal(kind, peer), least, c.timeoutNs, err, phase);
}

// The received-data mark of (op, parity, peer): local, written only by our receive halves.
__device__ __forceinline__ uint64_t* receivedMark(const LLCommon& c, int op, uint32_t parity, int peer) {
  return reinterpret_cast<uint64_t*>(c.local + c.layout.receivedAt(op, parity, peer));
}

// The source of received message m: the largest r with start[r] <= m (start: prefix of counts).
__device__ __forceinline__ int sourceOf(const int* start, int R, int m) {
  int lo = 0, hi = R - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (start[mid] <= m) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

}  // namespace ll
}  // namespace ncclep
