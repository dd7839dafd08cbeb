// HT combine: for each token, the sum of every row that came from it, reduced in two steps.
//
// Prepare kernel: invert the dispatch's recv_slot (row -> slot) into rowsOf[slot] (slot -> rows),
// so that each slot's rows can be summed together.
//
// Combine kernel. Blocks [0, sendBlocks) are on the expert side: warps, spread over the token
// owners, sum each received slot's rows (fp32, rows in ascending order) and store one bf16 row
// (and, with topk_weights, the per-choice sums of the rows' weights) into slot j of our region in
// the owner's window, then its flag (release). The other blocks are on the owner side: a warp per
// token waits for the flags of the ranks it went to and sums their rows in rank order (fp32),
// which is the reference's order exactly.
//
// A rank that rejected the call sends no row: it stores the flag (epoch << 32 | its reject word) in
// every slot of its region at every rank, so whichever slots a token owner waits for, it finds the
// rejection there (recorded; that rank's row counts as none). Its own owner side does nothing.
#include <cstddef>

#include "common/device_error.cuh"
#include "common/memory_order.cuh"
#include "common/reject.h"
#include "kernels/ht/ht_common.cuh"
#include "kernels/ht/ht_messages.cuh"
#include "kernels/ht/ht_params.h"
#include "transport/lsa.cuh"

namespace ncclep {
namespace {

using ht::kFull;

__global__ void __launch_bounds__(kHTThreads) htCombinePrepareKernel(const __grid_constant__ HTCombineParams p) {
  const HTLayout& l = p.c.layout;
  const int slots = p.c.nRanks * l.maxTokens;
  int* rowCount = reinterpret_cast<int*>(p.c.local + l.rowCount);
  int* rowsOf = reinterpret_cast<int*>(p.c.local + l.rowsOf);
  for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < p.numRows; r += gridDim.x * blockDim.x) {
    const int slot = p.recvSlot[r];
    if (slot < 0 || slot >= slots) continue;
    const int k = atomicAdd(&rowCount[slot], 1);
    if (k < l.maxTopk) rowsOf[int64_t(slot) * l.maxTopk + k] = r;
  }
}

// The rejecting rank's send side: the reject flag in every slot of our region at every rank.
__device__ void sendRejectFlags(const HTCommon& c, const transport::Lsa& lsa, uint32_t seq, int rejectCode) {
  const int lane = threadIdx.x & 31;
  if (!ht::warpWaitPeersDone(c, lsa, seq, kPhaseHTCombineSend, lane)) return;
  const uint64_t flag = ((uint64_t(seq) + 1) << 32) | rejectWord(rejectCode);
  const int w = blockIdx.x * kHTWarps + (threadIdx.x >> 5), warps = c.sendBlocks * kHTWarps;
  for (int d = 0; d < c.nRanks; ++d) ht::storeRejectFlags(c.layout, lsa.peerBase(d), c.rank, flag, w, warps, lane);
}

__device__ void combineSend(const HTCombineParams& p, uint32_t seq) {
  const HTCommon& c = p.c;
  const HTLayout& l = c.layout;
  const transport::Lsa lsa{c.window, 0};
  const int R = c.nRanks, T = l.maxTokens;
  const int lane = threadIdx.x & 31;
  const uint64_t epoch = uint64_t(seq) + 1;
  if (p.rejectCode != 0) {
    sendRejectFlags(c, lsa, seq, p.rejectCode);
    return;
  }
  const ht::StreamShare share =
      ht::shareStreams(blockIdx.x * kHTWarps + (threadIdx.x >> 5), c.sendBlocks * kHTWarps, R);

  for (int owner = share.first; owner < R; owner += share.step) {
    const int messages = p.recvCounts[owner];
    if (share.h >= messages) continue;
    bool ready = true;
    if (lane == 0) ready = ht::waitPeerDone(c, lsa, owner, seq, kPhaseHTCombineSend);
    if (!__shfl_sync(kFull, ready, 0)) return;
    for (int j = share.h; j < messages; j += share.helpers) {
      char* msg = lsa.peerPtr<char>(owner, l.slots + (size_t(c.rank) * T + size_t(j)) * l.msgBytes);
      ht::writeCombineMessage(p, msg, owner * T + j, lane);
      __syncwarp();
      if (lane == 0) device::storeRelease(reinterpret_cast<uint64_t*>(msg + l.flagOffset), (epoch << 32) | uint32_t(j));
    }
  }
}

__device__ void combineRecv(const HTCombineParams& p, uint32_t seq) {
  const HTCommon& c = p.c;
  const HTLayout& l = c.layout;
  const int R = c.nRanks, K = p.topk;
  const int lane = threadIdx.x & 31;
  const int warps = (gridDim.x - c.sendBlocks) * kHTWarps;
  const int w = (blockIdx.x - c.sendBlocks) * kHTWarps + (threadIdx.x >> 5);
  const int vectors = p.hidden / 8;
  const uint32_t epoch = seq + 1;
  int4* out = static_cast<int4*>(p.out);
  bool reported = false;  // this lane recorded its rank's rejection (once per warp and rank)

  for (int b = w; b < p.numTokens; b += warps) {
    const int slot = lane < R ? p.sendPos[int64_t(b) * R + lane] : -1;
    const char* msg = slot >= 0 ? ht::slotPtr(c.local, l, lane, slot) : nullptr;
    bool ok = true, rejected = false;
    if (slot >= 0) {
      uint64_t flag = 0;
      ok = ht::waitEpoch(reinterpret_cast<const uint64_t*>(msg + l.flagOffset), epoch, &flag, c, kPhaseHTCombineRecv,
                         lane);
      rejected = ok && ht::peerRejected(c, uint32_t(flag), kPhaseHTCombineRecv, lane, !reported);
      reported = reported || rejected;
    }
    if (!__all_sync(kFull, ok)) return;
    __syncwarp();  // each message's flag was acquired by its lane
    // ranks in ascending order, as the reference; a rank that rejected the call adds nothing
    const uint32_t from = __ballot_sync(kFull, slot >= 0 && !rejected);
    ht::warpSumRows<true>(out + int64_t(b) * vectors, reinterpret_cast<const int4*>(msg), from, vectors, lane);
    if (p.outWeights != nullptr) {
      const float weight = ht::warpSumWeights(msg, from, l.payloadBytes, K, lane);
      if (lane < K) p.outWeights[int64_t(b) * K + lane] = weight;
    }
  }
}

__global__ void __launch_bounds__(kHTThreads, 1) htCombineKernel(const __grid_constant__ HTCombineParams p) {
  __shared__ bool last;
  const uint32_t seq = ht::callSeq(p.c);
  if (int(blockIdx.x) < p.c.sendBlocks) combineSend(p, seq);
  else if (p.rejectCode == 0) combineRecv(p, seq);
  ht::finishCall(p.c, seq, &last);
}

}  // namespace

int launchHTCombinePrepare(const HTCombineParams& p, int numBlocks, cudaStream_t stream) {
  const HTLayout& l = p.c.layout;
  cudaError_t e = cudaMemsetAsync(p.c.local + l.rowCount, 0, size_t(p.c.nRanks) * l.maxTokens * 4, stream);
  if (e != cudaSuccess) return int(e);
  if (p.numRows > 0) {
    int blocks = (p.numRows + kHTThreads - 1) / kHTThreads;
    blocks = blocks > numBlocks ? numBlocks : blocks;
    htCombinePrepareKernel<<<blocks, kHTThreads, 0, stream>>>(p);
  }
  return int(cudaGetLastError());
}

int launchHTCombine(const HTCombineParams& p, int numBlocks, cudaStream_t stream) {
  const int e = p.rejectCode != 0 ? 0 : launchHTCombinePrepare(p, numBlocks, stream);  // no handle to invert
  if (e != 0) return e;
  htCombineKernel<<<numBlocks, kHTThreads, 0, stream>>>(p);
  return int(cudaGetLastError());
}

}  // namespace ncclep
