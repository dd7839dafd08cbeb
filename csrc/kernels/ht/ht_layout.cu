// HT layout step: where each token goes, computed on the device, and the counts exchanged. One
// kernel, the count kernel.
//
// Per 32-token tile (a warp, lane = token): the tokens going to each destination rank and the
// tokens choosing each expert, and each token's rank within the tile. The per-expert rank comes
// from a lane mask built with atomicOr in shared memory, so it costs a few instructions per choice,
// not a comparison with every other choice of the tile. A block counts a group of kHTTileGroup
// consecutive tiles (a tile per warp), turns the tile counts into exclusive prefixes within the
// group, and publishes the group's count of each column (destination rank, expert) in groupScan.
// It then finds the count of the groups before it by decoupled look-back: it reads their words
// newest first until one holds an inclusive prefix (a group that found its own offset publishes
// offset + count as one), so no block waits for the grid to finish and there is no second pass.
// The block writes its tokens' final positions itself: send_pos[b, d] (b's rank among our tokens
// going to d, -1 where b does not go) and expertPos[b, k] (among our tokens choosing expert k of b,
// -1 where b has no choice k) are group offset + tile offset + rank in the tile, in token order.
//
// The block that counts the last group knows the column totals (its offset plus its count) and
// sends every destination d our counts for it: per local expert of d, then the tokens for d, each
// in a 64-bit word (epoch << 32) | count of its own (ht_layout.h, `counts`), stored relaxed. There
// is no flag and no fence: a word is complete when it carries the call's epoch (a 64-bit aligned
// store is single-copy atomic), and nothing else is published with it, so d polls the words
// themselves (ht_dispatch.cu). A release flag cost a MEMBAR.SYS here, a wait for every count store
// to land across NVLink before the flag left. Its extra warp waits, while the others count, until d
// has read the counts' parity in its previous call, so that wait is off the path. A rank that
// rejected the call has no token (no group: block 0 sends) and puts its reject word (reject.h) in
// the tokens word in place of the tokens. The kernel is the only place that reports bad ids.
//
// With the hierarchical path (c.hier), the last group's block leaves the totals in the `totals`
// region instead, and the internode dispatch kernel sends the counts through the transport.
//
// The look-back needs the blocks co-resident (as the transfer kernels' roles do): the grid is at
// most the group's SMs, a block per SM.
#include <atomic>
#include <cstddef>
#include <cstdint>

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

constexpr int kTileThreads = kHTTileGroup * 32;    // a warp per tile of the group
constexpr int kCountThreads = kTileThreads + 32;   // and the warp that waits for the peers
constexpr int kMaskSpan = 1024;  // experts one pass of a tile's lane masks covers (more: several passes)
constexpr int kLookBack = 16;    // earlier groups' words loaded at once: the look-back is bound by load latency
constexpr uint32_t kInclusive = 1u << 31;  // in a groupScan word: the count of groups 0..g, not of g alone

static_assert(kHTTileGroup * kHTTile <= 0xffff, "a group's tile offsets are kept in 16 bits");

// Dynamic shared memory of a count block: per tile warp a lane-mask row over `span` experts; per
// tile of the group a count row, which becomes the tile's offset within the group, and one row
// more for the group's counts (16 bits: a group holds kHTTileGroup * 32 tokens); per column the
// group's offset (the count of the groups before it).
struct CountSmem {
  size_t tileRows, groupOffset, bytes;  // where the count rows and the offsets start; the size
};

__host__ __device__ constexpr int maskSpan(int numExperts) { return numExperts < kMaskSpan ? numExperts : kMaskSpan; }

__host__ __device__ constexpr CountSmem countSmem(int cols, int numExperts) {
  const size_t tileRows = size_t(kHTTileGroup) * size_t(maskSpan(numExperts)) * 4;
  const size_t groupOffset = tileRows + (size_t(kHTTileGroup + 1) * size_t(cols) * 2 + 15) / 16 * 16;
  return {tileRows, groupOffset, groupOffset + size_t(cols) * 4};
}

static_assert(countSmem(kHTMaxRanks + kHTMaxExperts, kHTMaxExperts).bytes <= 227 * 1024,
              "a count block's shared memory fits an SM at the kernels' limits");

// A count block's barriers, not .aligned (barrier.sync, not __syncthreads' bar.sync): the peer warp
// meets the tile warps at other instructions than theirs. The tile warps' own (barrier 1) leaves
// the peer warp out, so that its wait for the peers never holds up the counting.
__device__ __forceinline__ void tileWarpsSync() {
  asm volatile("barrier.sync 1, %0;" ::"n"(kTileThreads) : "memory");
}
__device__ __forceinline__ void blockSync() { asm volatile("barrier.sync 0, %0;" ::"n"(kCountThreads) : "memory"); }

// One 32-token tile (a warp, lane = token): in `row`, the tile's tokens going to each destination
// rank and choosing each expert; per lane the checked experts of its token, each one's rank among
// the tile's tokens choosing it, and the destinations of the token. `mask`: the warp's mask row.
template <int KM>
__device__ __forceinline__ void countTile(const HTDispatchParams& p, int t, uint32_t* mask, int span, uint16_t* row,
                                          int (&e)[KM], int (&rank)[KM], uint32_t& destMask, uint32_t lower,
                                          const device::ErrorSink& err) {
  const HTCommon& c = p.c;
  const int R = c.nRanks, E = c.numExperts, L = c.layout.numLocalExperts;
  const int lane = threadIdx.x & 31;
  for (int i = lane; i < R + E; i += 32) row[i] = 0;
  const int b = t * kHTTile + lane;
  device::laneTokenExperts<KM>(p.topkIdx, p.topkIdx64, b, b < p.numTokens, p.topk, E, e, err, kPhaseHTLayout);
  destMask = 0;
#pragma unroll
  for (int k = 0; k < KM; ++k) {
    rank[k] = 0;
    if (e[k] >= 0) destMask |= 1u << (e[k] / L);
  }
  // Experts [first, first + span) per pass (one pass when E <= kMaskSpan). `unsigned(e - first) <
  // span` also drops e = -1. The first __syncwarp orders the zeroing (and the row's) before the
  // atomics and the counts; the second, the atomics before the reads; the third, the reads before
  // the next pass zeroes the mask (every lane holding expert x writes the same count).
  for (int first = 0; first < E; first += span) {
    for (int i = lane; i < span; i += 32) mask[i] = 0;
    __syncwarp();
#pragma unroll
    for (int k = 0; k < KM; ++k) {
      if (unsigned(e[k] - first) < unsigned(span)) atomicOr(&mask[e[k] - first], 1u << lane);
    }
    __syncwarp();
#pragma unroll
    for (int k = 0; k < KM; ++k) {
      if (unsigned(e[k] - first) >= unsigned(span)) continue;
      const uint32_t lanes = mask[e[k] - first];
      rank[k] = __popc(lanes & lower);
      row[R + e[k]] = uint16_t(__popc(lanes));
    }
    __syncwarp();
  }
  for (int d = 0; d < R; ++d) {
    const uint32_t ballot = __ballot_sync(kFull, (destMask >> d) & 1u);
    if (lane == 0) row[d] = uint16_t(__popc(ballot));
  }
}

__device__ __forceinline__ uint64_t scanWord(uint32_t epoch, uint32_t flags, int count) {
  return (uint64_t(epoch) << 32) | flags | uint32_t(count);
}

// The count of column `col` in groups [0, g): the groups' words in `scan` newest first, kLookBack
// loaded at once, summed until one holds an inclusive prefix. A word of an earlier call (another
// epoch) is not yet this call's: wait for it (its block is running: the blocks are co-resident).
__device__ __forceinline__ int countBefore(const uint64_t* scan, int g, int col, int cols, uint32_t epoch,
                                           const HTCommon& c) {
  int sum = 0;
  for (int top = g - 1; top >= 0; top -= kLookBack) {
    uint64_t w[kLookBack];
#pragma unroll
    for (int u = 0; u < kLookBack; ++u) {
      w[u] = top - u >= 0 ? device::loadRelaxedGpu(scan + size_t(top - u) * cols + col) : 0;
    }
#pragma unroll
    for (int u = 0; u < kLookBack; ++u) {
      if (top - u < 0) return sum;
      uint64_t word = w[u];
      if (uint32_t(word >> 32) != epoch) {
        const uint64_t* at = scan + size_t(top - u) * cols + col;
        const auto current = [&] {
          word = device::loadRelaxedGpu(at);
          return uint32_t(word >> 32) == epoch;
        };
        device::waitUntil<device::FlagBackoff>(current, c.timeoutNs, ht::sink(c), kPhaseHTLayout, -1, top - u);
      }
      sum += int(uint32_t(word) & ~kInclusive);
      if (uint32_t(word) & kInclusive) return sum;
    }
  }
  return sum;
}

template <int KM>
__global__ void __launch_bounds__(kCountThreads, 1) htCountKernel(const __grid_constant__ HTDispatchParams p) {
  const HTCommon& c = p.c;
  const HTLayout& l = c.layout;
  const int R = c.nRanks, L = l.numLocalExperts, K = p.topk;
  const int cols = R + c.numExperts;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tiles = (p.numTokens + kHTTile - 1) / kHTTile;
  const int groups = (tiles + kHTTileGroup - 1) / kHTTileGroup;
  // The block of the last group sends (block 0 when there is none); it counts it in its last round.
  const bool sender = int(blockIdx.x) == (groups > 0 ? (groups - 1) % int(gridDim.x) : 0);
  const uint32_t seq = ht::callSeq(c);
  const uint32_t parity = seq & 1u;
  const uint32_t epoch = seq + 1;
  const transport::Lsa lsa{c.window, 0};
  __shared__ char* peerBase[kHTMaxRanks];

  extern __shared__ __align__(16) unsigned char smem[];
  const int span = maskSpan(c.numExperts);
  const CountSmem at = countSmem(cols, c.numExperts);
  uint16_t* tileRows = reinterpret_cast<uint16_t*>(smem + at.tileRows);  // [kHTTileGroup + 1][cols]
  const uint16_t* groupCount = tileRows + size_t(kHTTileGroup) * cols;
  int* groupOffset = reinterpret_cast<int*>(smem + at.groupOffset);
  // A column's total: the last group's offset plus its count, in the sender after its last round.
  const auto total = [&](int col) { return groups > 0 ? groupOffset[col] + int(groupCount[col]) : 0; };

  if (warp == kHTTileGroup) {  // the peer warp
    if (!sender || c.hier) return;
    // Parity `parity` of d's counts was last read by d's call seq - 1: wait until d finished it.
    if (lane < R) {
      peerBase[lane] = lsa.peerBase(lane);
      ht::waitPeerDone(c, lsa, lane, seq >= 1 ? seq - 1 : 0, kPhaseHTLayout);
    }
    blockSync();  // our wait (and peerBase) before the stores, the totals before our reads
    // The tokens words, alongside the tile warps' per-expert words: no word waits for another.
    if (lane < R) {
      const uint32_t tokens = p.rejectCode != 0 ? rejectWord(p.rejectCode) : uint32_t(total(lane));
      uint64_t* word = reinterpret_cast<uint64_t*>(peerBase[lane] + ht::countsAt(l, parity, c.rank)) + L;
      device::storeRelaxedSys(word, (uint64_t(epoch) << 32) | tokens);
    }
    return;
  }

  const device::ErrorSink err = ht::sink(c);
  uint64_t* scan = reinterpret_cast<uint64_t*>(c.local + l.groupScan);
  int* expertPos = reinterpret_cast<int*>(c.local + l.expertPos);
  uint32_t* mask = reinterpret_cast<uint32_t*>(smem) + size_t(warp) * span;
  uint16_t* row = tileRows + size_t(warp) * cols;
  const uint32_t lower = (1u << lane) - 1u;
  for (int g = blockIdx.x; g < groups; g += gridDim.x) {
    const int t = g * kHTTileGroup + warp;
    int e[KM], rank[KM];
    uint32_t destMask = 0;
    if (t < tiles) countTile<KM>(p, t, mask, span, row, e, rank, destMask, lower, err);
    tileWarpsSync();
    // The tile counts become exclusive prefixes within the group; the group's counts go below them
    // and out to the other blocks (group 0's count is its inclusive prefix already). All columns
    // are published before this block looks back, so that no block waits for our look-back.
    const int n = tiles - g * kHTTileGroup < kHTTileGroup ? tiles - g * kHTTileGroup : kHTTileGroup;
    for (int col = threadIdx.x; col < cols; col += kTileThreads) {
      int acc = 0;
      for (int u = 0; u < n; ++u) {
        const int v = tileRows[size_t(u) * cols + col];
        tileRows[size_t(u) * cols + col] = uint16_t(acc);
        acc += v;
      }
      tileRows[size_t(kHTTileGroup) * cols + col] = uint16_t(acc);
      device::storeRelaxedGpu(scan + size_t(g) * cols + col, scanWord(epoch, g == 0 ? kInclusive : 0u, acc));
    }
    if (g > 0) {
      for (int col = threadIdx.x; col < cols; col += kTileThreads) {
        const int before = countBefore(scan, g, col, cols, epoch, c);
        groupOffset[col] = before;
        const uint64_t inclusive = scanWord(epoch, kInclusive, before + groupCount[col]);
        device::storeRelaxedGpu(scan + size_t(g) * cols + col, inclusive);
      }
    } else {
      for (int col = threadIdx.x; col < cols; col += kTileThreads) groupOffset[col] = 0;
    }
    tileWarpsSync();
    if (t < tiles) {  // positions: group offset + tile offset + rank in the tile
      const int b = t * kHTTile + lane;
      const bool valid = b < p.numTokens;
#pragma unroll
      for (int k = 0; k < KM; ++k) {
        if (k >= K) break;
        const int col = R + e[k];
        if (valid) expertPos[int64_t(b) * l.maxTopk + k] = e[k] >= 0 ? groupOffset[col] + row[col] + rank[k] : -1;
      }
      for (int d = 0; d < R; ++d) {
        const bool goes = (destMask >> d) & 1u;
        const uint32_t ballot = __ballot_sync(kFull, goes);
        if (valid) p.sendPos[int64_t(b) * R + d] = goes ? groupOffset[d] + row[d] + __popc(ballot & lower) : -1;
      }
    }
    tileWarpsSync();  // the rows and offsets read before the next round overwrites them
  }

  if (!sender) return;
  if (c.hier) {  // the internode dispatch kernel exchanges the counts (over the network too)
    int* totals = reinterpret_cast<int*>(c.local + l.totals);
    for (int col = threadIdx.x; col < cols; col += kTileThreads) totals[col] = total(col);
    return;
  }
  // After the peer warp's wait: d has read this parity's words, those of our dispatch two calls ago
  // (or older). Their older epoch is what tells d they are not this call's; a word is never seen
  // half-written (one 64-bit store), so the words need no order among themselves and no fence.
  blockSync();
  const uint64_t tag = uint64_t(epoch) << 32;
  const size_t ours = ht::countsAt(l, parity, c.rank);
  for (int i = threadIdx.x; i < R * L; i += kTileThreads) {
    const int d = i / L, e = i % L;
    device::storeRelaxedSys(reinterpret_cast<uint64_t*>(peerBase[d] + ours) + e, tag | uint32_t(total(R + i)));
  }
}

// Raises the count kernel's dynamic shared memory limit past the default 48 KB (about 480 experts
// and more) when a group needs more than any before it on this device: the attribute is per
// function and device, and a call costs host time.
template <int KM>
int launchCount(const HTDispatchParams& p, int blocks, cudaStream_t stream) {
  const size_t bytes = countSmem(p.c.nRanks + p.c.numExperts, p.c.numExperts).bytes;
  constexpr size_t kDefaultBytes = 48 * 1024;
  constexpr int kMaxDevices = 64;
  static std::atomic<size_t> granted[kMaxDevices];
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return int(e);
  const bool beyondGranted = device >= kMaxDevices || bytes > granted[device].load(std::memory_order_relaxed);
  if (bytes > kDefaultBytes && beyondGranted) {
    e = cudaFuncSetAttribute(htCountKernel<KM>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
    if (e != cudaSuccess) return int(e);
    if (device < kMaxDevices) granted[device].store(bytes, std::memory_order_relaxed);
  }
  htCountKernel<KM><<<blocks, kCountThreads, bytes, stream>>>(p);
  return int(cudaGetLastError());
}

}  // namespace

int launchHTLayout(const HTDispatchParams& p, int numSms, cudaStream_t stream) {
  const int tiles = (p.numTokens + kHTTile - 1) / kHTTile;
  int blocks = (tiles + kHTTileGroup - 1) / kHTTileGroup;
  blocks = blocks < 1 ? 1 : (blocks > numSms ? numSms : blocks);
  if (p.topk <= 8) return launchCount<8>(p, blocks, stream);
  if (p.topk <= 16) return launchCount<16>(p, blocks, stream);
  return launchCount<32>(p, blocks, stream);
}

}  // namespace ncclep
