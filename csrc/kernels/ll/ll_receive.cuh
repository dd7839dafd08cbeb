// Receive-side lookups shared by the LL kernels.
#pragma once

#include <cstdint>

#include "common/memory_order.cuh"
#include "kernels/ll/ll_params.h"
#include "transport/peers.cuh"

namespace ncclep {
namespace ll {

// What a completed call adds to each source's acknowledgement signal (ll_layout.h, kLLAckPerCall).
template <class Net>
__device__ __forceinline__ constexpr uint64_t ackPerCall() {
  return Net::kCrossesNodes ? 1 : kLLAckPerCall;
}

// This block's share of a call's acknowledgement where every block acknowledges for itself
// (ll_layout.h, kLLAckPerCall).
__device__ __forceinline__ uint64_t ackShare() {
  return blockIdx.x == 0 ? kLLAckPerCall - (gridDim.x - 1) : 1;
}

// The calls of `half` (LLHalf) this block has finished: the number of the call it works on now.
__device__ __forceinline__ uint64_t blockCalls(const LLCommon& c, int half) {
  const LLState* state = reinterpret_cast<const LLState*>(c.local + c.layout.state);
  return *reinterpret_cast<const volatile uint64_t*>(&state->calls[half][blockIdx.x]);
}

__device__ __forceinline__ void endBlockCall(const LLCommon& c, int half, uint64_t seq) {
  LLState* state = reinterpret_cast<LLState*>(c.local + c.layout.state);
  state->calls[half][blockIdx.x] = seq + 1;
}

// The received-data mark that call `call` of `op` reads for `peer` (ll_layout.h, kLLMarkSlots):
// local, written only by our receive halves, as `call + 2`'s at the end of `call`.
__device__ __forceinline__ uint64_t* receivedMark(const LLCommon& c, int op, uint64_t call, int peer) {
  return reinterpret_cast<uint64_t*>(c.local + c.layout.receivedAt(op, call, peer));
}

// The end of a receive half (`half`, LLHalf), called by every thread of the block after the barrier
// that followed its last loads of the sources' data: the marks for call seq + 2 stored once
// (storeMark(r) by thread r), then each source acknowledged on signal `ackKind`, so that it may
// reuse this parity. In a group with no network peer each block adds its own share (relaxed: it
// publishes nothing, unless release(r) says it must order an earlier add of this thread that r
// reads through the acknowledgement) and one block (`storesMarks`) stores the marks: no block waits
// for the others. Across the network the last block to arrive (`last`, shared memory) does both.
template <class Net, class StoreMark, class Release>
__device__ __forceinline__ void acknowledgeSources(const LLCommon& c, const transport::Peers<Net>& peers, int half,
                                                   int ackKind, bool& last, bool storesMarks, StoreMark storeMark,
                                                   Release release) {
  const int tid = threadIdx.x, R = c.nRanks;
  if constexpr (!Net::kCrossesNodes) {
    if (tid < R) {
      if (storesMarks) storeMark(tid);
      if (release(tid)) peers.signal(tid, ackKind, ackShare());
      else peers.signalRelaxed(tid, ackKind, ackShare());
    }
    return;
  }
  LLState* state = reinterpret_cast<LLState*>(c.local + c.layout.state);
  if (tid == 0) last = device::arriveLast(&state->blocksDone[half], gridDim.x);
  __syncthreads();
  if (!last) return;
  if (tid == 0) state->blocksDone[half] = 0;
  if (tid < R) {
    storeMark(tid);
    peers.signal(tid, ackKind, 1);
  }
}

// Thread R + 2r + q (tid, R <= tid < 3R) reads (acquire) rank r's data signal of parity q, so that
// both are read before the call's parity is known; the one of `parity` goes to seen[r].
template <class Peers>
__device__ __forceinline__ void readDataSignal(const Peers& peers, int firstKind, int R, uint32_t parity, int tid,
                                               uint64_t* seen) {
  const int r = (tid - R) >> 1, q = (tid - R) & 1;
  const uint64_t got = peers.read(r, firstKind + q);
  if (uint32_t(q) == parity) seen[r] = got;
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

// One warp's exclusive prefix over ranks (32 a step) of count(r): place(r, n, start) for each
// rank r < R, in the lane of r; returns the total in every lane.
template <typename Count, typename Place>
__device__ __forceinline__ int warpPrefix(int R, Count count, Place place) {
  const int lane = threadIdx.x & 31;
  int base = 0;
  for (int r0 = 0; r0 < R; r0 += 32) {
    const int r = r0 + lane;
    const int n = r < R ? count(r) : 0;
    int inclusive = n;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int below = __shfl_up_sync(0xffffffffu, inclusive, o);
      if (lane >= o) inclusive += below;
    }
    if (r < R) place(r, n, base + inclusive - n);
    base += __shfl_sync(0xffffffffu, inclusive, 31);
  }
  return base;
}

}  // namespace ll
}  // namespace ncclep
