// Receive-side lookups shared by the LL kernels.
#pragma once

#include <cstdint>

#include "kernels/ll/ll_params.h"

namespace ncclep {
namespace ll {

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
