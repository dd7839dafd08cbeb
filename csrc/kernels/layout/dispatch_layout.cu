// get_dispatch_layout's kernel: a thread per token reads its top-k ids, counts each new expert,
// gathers the token's ranks in a 64-bit mask, writes its row of is_token_in_rank and counts its
// ranks and nodes. The counts go to a block's counters in shared memory first ([R | N | E], like
// the output), which it then adds to the output with one global atomic per nonzero entry.
#include <cstdint>

#include "common/expert_ids.cuh"
#include "kernels/layout/dispatch_layout.h"

namespace ncclep {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 1024;  // more tokens: each thread takes several (fewer flushes of E counters)

// One token's row of is_token_in_rank: byte r = bit r of `ranks`. Four bytes a store when the row is
// word-aligned.
__device__ __forceinline__ void writeRow(bool* row, uint64_t ranks, int R, bool words) {
  if (words) {
    for (int r = 0; r < R; r += 4) {
      uint32_t word = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) word |= uint32_t((ranks >> (r + i)) & 1u) << (8 * i);
      *reinterpret_cast<uint32_t*>(row + r) = word;
    }
  } else {
    for (int r = 0; r < R; ++r) row[r] = (ranks >> r) & 1u;
  }
}

__global__ void __launch_bounds__(kThreads) dispatchLayoutKernel(const DispatchLayoutParams p) {
  extern __shared__ int blockCounts[];  // [R | N | E], as p.counts
  const int R = p.numRanks, N = p.numNodes, E = p.numExperts, K = p.topk;
  const int cols = R + N + E;
  const int expertsPerRank = E / R, ranksPerNode = R / N;
  int* rankCounts = blockCounts;
  int* nodeCounts = blockCounts + R;
  int* expertCounts = blockCounts + R + N;
  const bool words = R % 4 == 0 && (reinterpret_cast<uintptr_t>(p.isTokenInRank) & 3u) == 0;

  for (int i = threadIdx.x; i < cols; i += blockDim.x) blockCounts[i] = 0;
  __syncthreads();

  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < p.numTokens; b += stride) {
    const int64_t first = b * K;
    uint64_t ranks = 0;
    for (int k = 0; k < K; ++k) {
      const int64_t id = device::loadExpertId(p.topkIdx, p.topkIdx64, first + k);
      if (id < 0 || id >= E) continue;
      // A repeat of an earlier choice counts once (top-k is small; the earlier ids are in L1).
      bool repeat = false;
      for (int j = 0; j < k && !repeat; ++j) repeat = device::loadExpertId(p.topkIdx, p.topkIdx64, first + j) == id;
      if (repeat) continue;
      atomicAdd(&expertCounts[id], 1);
      ranks |= 1ull << (int(id) / expertsPerRank);
    }
    uint64_t nodes = 0;
    for (uint64_t m = ranks; m != 0; m &= m - 1) {
      const int r = __ffsll(static_cast<long long>(m)) - 1;
      atomicAdd(&rankCounts[r], 1);
      nodes |= 1ull << (r / ranksPerNode);
    }
    for (uint64_t m = nodes; m != 0; m &= m - 1) atomicAdd(&nodeCounts[__ffsll(static_cast<long long>(m)) - 1], 1);
    writeRow(p.isTokenInRank + b * R, ranks, R, words);
  }

  __syncthreads();
  for (int i = threadIdx.x; i < cols; i += blockDim.x) {
    const int count = blockCounts[i];
    if (count != 0) atomicAdd(p.counts + i, count);
  }
}

}  // namespace

cudaError_t launchDispatchLayout(const DispatchLayoutParams& p, cudaStream_t stream) {
  const size_t cols = size_t(p.numRanks) + size_t(p.numNodes) + size_t(p.numExperts);
  cudaError_t err = cudaMemsetAsync(p.counts, 0, cols * sizeof(int32_t), stream);
  if (err != cudaSuccess || p.numTokens == 0) return err;
  const int64_t wanted = (p.numTokens + kThreads - 1) / kThreads;
  const int blocks = int(wanted < kMaxBlocks ? wanted : kMaxBlocks);
  dispatchLayoutKernel<<<blocks, kThreads, cols * sizeof(int), stream>>>(p);
  return cudaGetLastError();
}

}  // namespace ncclep
