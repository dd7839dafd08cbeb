// HT layout step: where each token goes, computed on the device, and the counts exchanged.
//
// Count kernel: per 32-token tile (a warp, lane = token), the tokens going to each destination
// rank and the tokens choosing each expert, and each token's rank within the tile: send_pos[b, d]
// first holds the earlier tokens of the tile going to d, expertPos[b, k] the earlier tokens of the
// tile choosing expert k of b (-1 where b does not go / has no choice k). The per-expert rank
// comes from a lane mask built with atomicOr in the tile's count row, so it costs a few
// instructions per choice, not a comparison with every other choice of the tile. A block counts
// a group of kHTTileGroup consecutive tiles (a tile per warp), then turns them into exclusive
// prefixes within the group and writes the group's totals. The last block to finish turns the
// group totals into exclusive prefixes over groups (so the scan after the arrival is over groups,
// not tiles) and sends every destination d our per-local-expert counts, then a flag (epoch << 32
// | tokens for d). It is the only place that reports bad ids. A rank that rejected the call has no
// token and puts its reject word (reject.h) in the flag in place of the tokens.
//
// With the hierarchical path (c.hier), the last block leaves the totals in the `totals` region
// instead, and the internode dispatch kernel sends the counts through the transport.
//
// Positions kernel: a thread per entry adds the tile's offset (its group's prefix plus its own
// within the group) to the in-tile rank: send_pos[b, d] += offset of b's tile for d,
// expertPos[b, k] += offset of b's tile for its expert.
#include <cstddef>

#include "common/device_error.cuh"
#include "common/expert_ids.cuh"
#include "common/memory_order.cuh"
#include "common/reject.h"
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

// One 32-token tile (a warp, lane = token): in `row`, the tile's tokens going to each destination
// rank and choosing each expert; each token's rank within the tile in send_pos and expertPos.
template <int KM>
__device__ __forceinline__ void countTile(const HTDispatchParams& p, int t, int* row, int* expertPos, uint32_t lower,
                                          const device::ErrorSink& err) {
  const HTCommon& c = p.c;
  const HTLayout& l = c.layout;
  const int R = c.nRanks, E = c.numExperts, L = l.numLocalExperts, K = p.topk;
  const int cols = R + E;
  const int lane = threadIdx.x & 31;
  for (int i = lane; i < cols; i += 32) row[i] = 0;
  __syncwarp();
  const int b = t * kHTTile + lane;
  const bool valid = b < p.numTokens;
  int e[KM];
  device::laneTokenExperts<KM>(p.topkIdx, p.topkIdx64, b, valid, K, E, e, err, kPhaseHTLayout);
  uint32_t destMask = 0;
#pragma unroll
  for (int k = 0; k < KM; ++k) {
    if (e[k] < 0) continue;
    atomicOr(reinterpret_cast<unsigned*>(&row[R + e[k]]), 1u << lane);
    destMask |= 1u << (e[k] / L);
  }
  // __syncwarp orders the lanes' atomics before the reads; the second one, the reads before the
  // row's entries are overwritten with counts (every lane holding expert x writes the same count).
  __syncwarp();
  uint32_t lanes[KM];
#pragma unroll
  for (int k = 0; k < KM; ++k) lanes[k] = e[k] >= 0 ? __ldcg(reinterpret_cast<const unsigned*>(&row[R + e[k]])) : 0u;
  __syncwarp();
#pragma unroll
  for (int k = 0; k < KM; ++k) {
    if (k >= K) break;
    if (e[k] >= 0) row[R + e[k]] = __popc(lanes[k]);
    if (valid) expertPos[int64_t(b) * l.maxTopk + k] = e[k] >= 0 ? __popc(lanes[k] & lower) : -1;
  }
  for (int d = 0; d < R; ++d) {
    const bool goes = (destMask >> d) & 1u;
    const uint32_t ballot = __ballot_sync(kFull, goes);
    if (lane == 0) row[d] = __popc(ballot);
    if (valid) p.sendPos[int64_t(b) * R + d] = goes ? __popc(ballot & lower) : -1;
  }
}

template <int KM>
__global__ void __launch_bounds__(kHTThreads, 1) htCountKernel(const __grid_constant__ HTDispatchParams p) {
  static_assert(kHTTileGroup == kHTWarps, "a count block counts one group of tiles at a time, a tile per warp");
  const HTCommon& c = p.c;
  const HTLayout& l = c.layout;
  const int R = c.nRanks, L = l.numLocalExperts;
  const int cols = R + c.numExperts;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tiles = (p.numTokens + kHTTile - 1) / kHTTile;
  const device::ErrorSink err = ht::sink(c);
  int* tileCounts = reinterpret_cast<int*>(c.local + l.tileCounts);
  __shared__ CountShared s;

  int* groupCounts = reinterpret_cast<int*>(c.local + l.groupCounts);
  int* expertPos = reinterpret_cast<int*>(c.local + l.expertPos);
  const uint32_t lower = (1u << lane) - 1u;
  const int groups = (tiles + kHTTileGroup - 1) / kHTTileGroup;
  for (int g = blockIdx.x; g < groups; g += gridDim.x) {
    const int t = g * kHTTileGroup + warp;
    if (t < tiles) countTile<KM>(p, t, tileCounts + size_t(t) * cols, expertPos, lower, err);
    __syncthreads();
    // The group's tile counts become exclusive prefixes within the group (one load per tile in
    // flight per column); the group's totals go beside them for the last block's scan.
    const int first = g * kHTTileGroup, n = tiles - first < kHTTileGroup ? tiles - first : kHTTileGroup;
    for (int col = threadIdx.x; col < cols; col += blockDim.x) {
      int v[kHTTileGroup];
#pragma unroll
      for (int u = 0; u < kHTTileGroup; ++u) v[u] = u < n ? __ldcg(tileCounts + size_t(first + u) * cols + col) : 0;
      int acc = 0;
#pragma unroll
      for (int u = 0; u < kHTTileGroup; ++u) {
        if (u < n) tileCounts[size_t(first + u) * cols + col] = acc;
        acc += v[u];
      }
      groupCounts[size_t(g) * cols + col] = acc;
    }
  }

  __syncthreads();
  if (threadIdx.x == 0) s.last = device::arriveLast(&ht::state(c)->blocksDone[0], gridDim.x);
  __syncthreads();
  if (!s.last) return;

  constexpr int kBatch = 16;  // group counts loaded at once: the scan is bound by load latency
  for (int col = threadIdx.x; col < cols; col += blockDim.x) {
    int acc = 0;
    for (int g0 = 0; g0 < groups; g0 += kBatch) {
      int v[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) v[u] = g0 + u < groups ? __ldcg(groupCounts + size_t(g0 + u) * cols + col) : 0;
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        if (g0 + u < groups) groupCounts[size_t(g0 + u) * cols + col] = acc;
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
    ht::waitPeerDone(c, lsa, d, seq >= 1 ? seq - 1 : 0, kPhaseHTLayout);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < R * L; i += blockDim.x) {
    const int d = i / L, e = i % L;
    *lsa.peerPtr<int32_t>(d, l.counts + ((size_t(parity) * R + c.rank) * L + e) * 4) = s.colTotal[R + i];
  }
  __syncthreads();
  const uint64_t epoch = uint64_t(seq) + 1;
  for (int d = threadIdx.x; d < R; d += blockDim.x) {
    const uint32_t tokens = p.rejectCode != 0 ? rejectWord(p.rejectCode) : uint32_t(s.colTotal[d]);
    lsa.signal(d, l.countFlags + (size_t(parity) * R + c.rank) * 8, (epoch << 32) | tokens);
  }
  if (threadIdx.x == 0) ht::state(c)->blocksDone[0] = 0;
}

__global__ void __launch_bounds__(kHTThreads) htPositionsKernel(const __grid_constant__ HTDispatchParams p) {
  const HTCommon& c = p.c;
  const HTLayout& l = c.layout;
  const int R = c.nRanks, K = p.topk, cols = R + c.numExperts;
  const int* tileOffsets = reinterpret_cast<const int*>(c.local + l.tileCounts);
  const int* groupOffsets = reinterpret_cast<const int*>(c.local + l.groupCounts);
  // A tile's offset in a column: its group's, plus its own within the group.
  auto offset = [&](int b, int col) {
    const int t = b / kHTTile;
    return groupOffsets[size_t(t / kHTTileGroup) * cols + col] + tileOffsets[size_t(t) * cols + col];
  };
  int* expertPos = reinterpret_cast<int*>(c.local + l.expertPos);
  const int stride = gridDim.x * blockDim.x;  // entries fit in int: T * maxTopk slots are planned
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < p.numTokens * R; i += stride) {
    const int b = i / R, d = i - b * R;
    const int rank = p.sendPos[i];
    if (rank >= 0) p.sendPos[i] = offset(b, d) + rank;
  }
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < p.numTokens * K; i += stride) {
    const int b = i / K, k = i - b * K;
    int* pos = expertPos + size_t(b) * l.maxTopk + k;
    const int rank = *pos;  // -1: no valid choice k (the count kernel checked the id)
    if (rank >= 0) *pos = offset(b, R + int(device::loadExpertId(p.topkIdx, p.topkIdx64, i))) + rank;
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
    const int64_t entries = int64_t(p.numTokens) * (p.topk > p.c.nRanks ? p.topk : p.c.nRanks);
    const int64_t wanted = (entries + kHTThreads - 1) / kHTThreads;
    const int positionBlocks = int(wanted < 4 * numSms ? wanted : 4 * numSms);
    htPositionsKernel<<<positionBlocks, kHTThreads, 0, stream>>>(p);
  }
  return int(cudaGetLastError());
}

}  // namespace ncclep
