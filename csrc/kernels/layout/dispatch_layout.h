// DeepEP's get_dispatch_layout on the device: from a call's top-k expert ids, which ranks each token
// goes to and the tokens each rank, node and expert receives. Host-callable launcher (compiled by
// nvcc in dispatch_layout.cu); csrc/python/dispatch_layout.cc binds it. No group, no communication.
//
// The ids follow the kernels' rules (common/expert_ids.cuh), silently: an id outside [0, numExperts)
// is no choice, and a token that names an expert twice counts once for it.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace ncclep {

constexpr int kDispatchLayoutMaxRanks = 64;      // a token's ranks are one 64-bit mask
constexpr int kDispatchLayoutMaxExperts = 8192;  // a block's counters fit the default shared memory

struct DispatchLayoutParams {
  const void* topkIdx;  // [numTokens, topk] row-major, int32 or int64
  int topkIdx64;        // 1: int64 ids
  int64_t numTokens;
  int topk;
  int numExperts;  // numExperts / numRanks experts per rank
  int numRanks;
  int numNodes;  // numRanks / numNodes consecutive ranks per node (1: the whole group)
  // [numRanks | numNodes | numExperts]: tokens per rank, per node, per expert
  int32_t* counts;
  bool* isTokenInRank;  // [numTokens, numRanks]
};

// Zeroes p.counts (one cudaMemsetAsync) and, when there are tokens, launches the kernel on
// `stream`. The caller checks the sizes: numRanks <= kDispatchLayoutMaxRanks, numExperts <=
// kDispatchLayoutMaxExperts, both divisible as described above. Returns the first CUDA error.
cudaError_t launchDispatchLayout(const DispatchLayoutParams& p, cudaStream_t stream);

}  // namespace ncclep
