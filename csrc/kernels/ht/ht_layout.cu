// HT layout step: where each token goes, computed on the device, and the counts exchanged.
//
// Count kernel: per 32-token tile (a warp, lane = token), the tokens going to each destination
// rank and the tokens choosing each expert. The last block to finish turns the tile counts into
// exclusive prefixes over tiles (in place) and sends every destination d our per-local-expert
// counts, then a flag (epoch << 32 | tokens for d). It is the only place that reports bad ids.
//
// With the hierarchical path (c.hier), the last block leaves the totals in the `totals` region
// instead, and the internode dispatch kernel sends the counts through the transport.
//
// Positions kernel: per tile (lane = token), send_pos[b, d] = the tile's prefix for d plus the
// earlier tokens of the tile going to d, and expertPos[b, k] = the row of (b, k) among our tokens
// for that expert (prefix plus earlier tokens of the tile choosing it).
#include <cstddef>

#include "common/device_error.cuh"
#include "common/memory_order.cuh"
#include "kernels/ht/ht_common.cuh"
#include "kernels/ht/ht_params.h"
#include "transport/lsa.cuh"

namespace ncclep {
namespace {

using ht::kFull;

struct CountShared {
  int colTotal[kHTMaxRanks + kHTMaxExperts];
  bool last;
};

template <int KM>
__global__ void __launch_bounds__(kHTThreads, 1) htCountKernel(const __grid_constant__ HTDispatchParams p) {
  const HTCommon& c = p.c;
  const HTLayout& l = c.layout;
  const int R = c.nRanks, E = c.numExperts, L = l.numLocalExperts, K = p.topk;
  const int cols = R + E;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tiles = (p.numTokens + kHTTile - 1) / kHTTile;
  const device::ErrorSink err = ht::sink(c);
  int* tileCounts = reinterpret_cast<int*>(c.local + l.tileCounts);
  __shared__ CountShared s;

  for (int t = blockIdx.x * kHTWarps + warp; t < tiles; t += gridDim.x * kHTWarps) {
    int* row = tileCounts + size_t(t) * cols;
    for (int i = lane; i < cols; i += 32) row[i] = 0;
    __syncwarp();
    const int b = t * kHTTile + lane;
    int e[KM];
    ht::laneTokenExperts<KM>(p.topkIdx, p.topkIdx64, b, b < p.numTokens, K, E, e, &err, kPhaseHTLayout);
    uint32_t destMask = 0;
#pragma unroll
    for (int k = 0; k < KM; ++k) {
      if (e[k] < 0) continue;
      atomicAdd(&row[R + e[k]], 1);
      destMask |= 1u << (e[k] / L);
    }
    for (int d = 0; d < R; ++d) {
      const int n = __popc(__ballot_sync(kFull, (destMask >> d) & 1u));
      if (lane == 0) row[d] = n;
    }
  }

  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    s.last = device::arriveLast(&ht::state(c)->blocksDone[0], gridDim.x);
  }
  __syncthreads();
  if (!s.last) return;

  constexpr int kBatch = 16;  // tile counts loaded at once: the scan is bound by load latency
  for (int col = threadIdx.x; col < cols; col += blockDim.x) {
    int acc = 0;
    for (int t0 = 0; t0 < tiles; t0 += kBatch) {
      int v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) v[u] = t0 + u < tiles ? __ldcg(tileCounts + size_t(t0 + u) * cols + col) : 0;
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (t0 + u < tiles) tileCounts[size_t(t0 + u) * cols + col] = acc;
        acc += v[u];
      }
    }
    s.colTotal[col] = acc;
  }

  if (c.hier) {  // the internode dispatch kernel exchanges the counts (over the network too)
    int* totals = reinterpret_cast<int*>(c.local + l.totals);
    for (int col = threadIdx.x; col < cols; col += blockDim.x) totals[col] = s.colTotal[col];
    if (threadIdx.x == 0) ht::state(c)->blocksDone[0] = 0;
    return;
  }
  const uint32_t seq = ht::callSeq(c);
  const uint32_t parity = seq & 1u;
  const transport::Lsa lsa{c.window, 0};
  // Parity `parity` of d's counts was last read by d's call seq - 1: wait until d finished it.
  for (int d = threadIdx.x; d < R; d += blockDim.x) {
    const uint64_t* done = lsa.peerPtr<uint64_t>(d, l.state + offsetof(HTState, done));
    ht::waitPeerDone(c, done, seq >= 1 ? seq - 1 : 0, kPhaseHTLayout, d);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < R * L; i += blockDim.x) {
    const int d = i / L, e = i % L;
    *lsa.peerPtr<int32_t>(d, l.counts + ((size_t(parity) * R + c.rank) * L + e) * 4) = s.colTotal[R + i];
  }
  __syncthreads();
  const uint64_t epoch = uint64_t(seq) + 1;
  for (int d = threadIdx.x; d < R; d += blockDim.x) {
    device::fenceSystem();
    lsa.signal(d, l.countFlags + (size_t(parity) * R + c.rank) * 8, (epoch << 32) | uint32_t(s.colTotal[d]));
  }
  if (threadIdx.x == 0) ht::state(c)->blocksDone[0] = 0;
}

template <int KM>
__global__ void __launch_bounds__(kHTThreads) htPositionsKernel(const __grid_constant__ HTDispatchParams p) {
  const HTCommon& c = p.c;
  const HTLayout& l = c.layout;
  const int R = c.nRanks, E = c.numExperts, L = l.numLocalExperts, K = p.topk;
  const int cols = R + E;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tiles = (p.numTokens + kHTTile - 1) / kHTTile;
  const int* tileOffsets = reinterpret_cast<const int*>(c.local + l.tileCounts);
  int* expertPos = reinterpret_cast<int*>(c.local + l.expertPos);
  const uint32_t lower = (1u << lane) - 1u;

  for (int t = blockIdx.x * kHTWarps + warp; t < tiles; t += gridDim.x * kHTWarps) {
    const int b = t * kHTTile + lane;
    const bool valid = b < p.numTokens;
    const int* off = tileOffsets + size_t(t) * cols;
    int e[KM];
    ht::laneTokenExperts<KM>(p.topkIdx, p.topkIdx64, b, valid, K, E, e, nullptr, 0);
    uint32_t mask = 0;
#pragma unroll
    for (int k = 0; k < KM; ++k)
      if (e[k] >= 0) mask |= 1u << (e[k] / L);
    for (int d = 0; d < R; ++d) {
      const bool goes = (mask >> d) & 1u;
      const uint32_t ballot = __ballot_sync(kFull, goes);
      if (valid) p.sendPos[int64_t(b) * R + d] = goes ? off[d] + __popc(ballot & lower) : -1;
    }
    // Earlier tokens of the tile that chose the same expert (experts are distinct per token).
    int before[KM];
#pragma unroll
    for (int k = 0; k < KM; ++k) before[k] = 0;
    for (int src = 0; src < kHTTile; ++src) {
#pragma unroll
      for (int k2 = 0; k2 < KM; ++k2) {
        if (k2 >= K) break;
        const int other = __shfl_sync(kFull, e[k2], src);
#pragma unroll
        for (int k = 0; k < KM; ++k) before[k] += (src < lane && other >= 0 && other == e[k]) ? 1 : 0;
      }
    }
    if (valid) {
#pragma unroll
      for (int k = 0; k < KM; ++k)
        if (k < K) expertPos[int64_t(b) * l.maxTopk + k] = e[k] >= 0 ? off[R + e[k]] + before[k] : -1;
    }
  }
}

}  // namespace

int launchHTLayout(const HTDispatchParams& p, int numSms, cudaStream_t stream) {
  const int tiles = (p.numTokens + kHTTile - 1) / kHTTile;
  int blocks = (tiles + kHTWarps - 1) / kHTWarps;
  blocks = blocks < 1 ? 1 : (blocks > numSms ? numSms : blocks);
  if (p.topk <= 8) htCountKernel<8><<<blocks, kHTThreads, 0, stream>>>(p);
  else if (p.topk <= 16) htCountKernel<16><<<blocks, kHTThreads, 0, stream>>>(p);
  else htCountKernel<32><<<blocks, kHTThreads, 0, stream>>>(p);
  if (tiles > 0) {
    if (p.topk <= 8) htPositionsKernel<8><<<blocks, kHTThreads, 0, stream>>>(p);
    else if (p.topk <= 16) htPositionsKernel<16><<<blocks, kHTThreads, 0, stream>>>(p);
    else htPositionsKernel<32><<<blocks, kHTThreads, 0, stream>>>(p);
  }
  return int(cudaGetLastError());
}

}  // namespace ncclep
