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
