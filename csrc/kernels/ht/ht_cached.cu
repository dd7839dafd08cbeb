// HT cached dispatch: routes a tensor [B, ...] along an earlier dispatch (its handle), without a
// layout step: the backward of combine. Row r of the output gets the row of the token in recv_slot[r],
// zeros where recv_slot[r] is -1.
//
// Blocks [0, sendBlocks) send: a warp per token stores its row into slot send_pos[b, d] of our
// region at each destination d, then the slot's flag (release). The other blocks receive: a warp
// per output row waits for its slot's flag and copies the row (one slot may feed several rows).
//
// A rank that rejected the call sends no row: the reject flag in every slot of its region at every
// rank (as in combine); a receiver finds it in the slot it waits for, records it and writes zeros.
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

__device__ void cachedSend(const HTCachedParams& p, uint32_t seq) {
  const HTCommon& c = p.c;
  const HTLayout& l = c.layout;
  const transport::Lsa lsa{c.window, 0};
  const int R = c.nRanks;
  const int lane = threadIdx.x & 31;
  const int warps = c.sendBlocks * kHTWarps;
  const int w = blockIdx.x * kHTWarps + (threadIdx.x >> 5);
  const uint64_t epoch = uint64_t(seq) + 1;
  if (p.rejectCode != 0) {
    if (!ht::warpWaitPeersDone(c, lsa, seq, kPhaseHTCachedSend, lane)) return;
    for (int d = 0; d < R; ++d)
      ht::storeRejectFlags(l, lsa.peerBase(d), c.rank, (epoch << 32) | rejectWord(p.rejectCode), w, warps, lane);
    return;
  }
  if (w >= p.numTokens) return;

  if (!ht::warpWaitPeersDone(c, lsa, seq, kPhaseHTCachedSend, lane)) return;

  for (int b = w; b < p.numTokens; b += warps) {
    const int slot = lane < R ? p.sendPos[int64_t(b) * R + lane] : -1;
    const char* row = static_cast<const char*>(p.x) + int64_t(b) * p.rowBytes;
    char* msg = slot >= 0 ? lsa.peerPtr<char>(lane, l.slots + (size_t(c.rank) * l.maxTokens + size_t(slot)) * l.msgBytes)
                          : nullptr;
    for (uint32_t m = __ballot_sync(kFull, slot >= 0); m != 0; m &= m - 1) {
      char* dst = reinterpret_cast<char*>(__shfl_sync(kFull, reinterpret_cast<uintptr_t>(msg), __ffs(m) - 1));
      ht::warpCopyBytes<false>(dst, row, p.rowBytes, lane);
    }
    __syncwarp();
    if (slot >= 0) device::storeRelease(reinterpret_cast<uint64_t*>(msg + l.flagOffset), (epoch << 32) | uint32_t(b));
  }
}

__global__ void __launch_bounds__(kHTThreads, 1) htCachedKernel(const __grid_constant__ HTCachedParams p) {
  __shared__ bool last;
  const uint32_t seq = ht::callSeq(p.c);
  if (int(blockIdx.x) < p.c.sendBlocks) cachedSend(p, seq);
  else if (p.rejectCode == 0)
    ht::receiveCachedRows(p, (blockIdx.x - p.c.sendBlocks) * kHTWarps + (threadIdx.x >> 5),
                          (gridDim.x - p.c.sendBlocks) * kHTWarps, seq + 1);
  ht::finishCall(p.c, seq, &last);
}

}  // namespace

int launchHTCached(const HTCachedParams& p, int numBlocks, cudaStream_t stream) {
  htCachedKernel<<<numBlocks, kHTThreads, 0, stream>>>(p);
  return int(cudaGetLastError());
}

}  // namespace ncclep
