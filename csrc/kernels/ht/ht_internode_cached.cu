// HT cached dispatch across (virtual) nodes: routes rows [B, rowBytes] along an earlier dispatch
// (its handle), by the dispatch's route. Roles (see ht_internode.cuh):
//
// Send: after waitPeersFree, block 0 puts our header to each forwarder (kHTSigHeader) and signals
//   the chunks past our tokens; a warp per token stores its row into slot send_pos[b, d] of our
//   row of d's slots for ranks d of our node (then the flag), and, if ranks of other nodes hold
//   it, stages one network message (row, send_pos row, token word) and puts it to our forwarder on
//   each such node; the warp that completes a chunk signals it to each forwarder.
// Forward: as for dispatch, rows only, chunk by chunk (ht_internode_forward.cuh).
// Receive: exactly the intranode receive: a warp per output row waits for the flag of its slot
//   (source, j) and copies the row; zeros where recv_slot is -1.
//
// A rank that rejected the call stores its reject flag in every slot of its row at each rank of
// its node, and sends its forwarders a header of zero tokens with its reason, on which they store
// the same flags at the ranks of their node (ht_internode_forward.cuh); the receivers record it and
// write zeros. Its own receive role does nothing.
#include <cstddef>

#include "common/device_error.cuh"
#include "common/memory_order.cuh"
#include "common/reject.h"
#include "kernels/ht/ht_common.cuh"
#include "kernels/ht/ht_internode.cuh"
#include "kernels/ht/ht_internode_forward.cuh"
#include "kernels/ht/ht_messages.cuh"
#include "kernels/ht/ht_params.h"

namespace ncclep {
namespace {

using ht::kFull;

struct Shared {
  int tokens[kHTMaxRanks];
  int rejects[kHTMaxRanks];  // forward: each source's reject code
  bool last;
};

template <class Net>
__device__ void sendRole(const transport::Peers<Net>& peers, const HTCachedParams& p, const ht::Topo& t,
                         uint32_t seq) {
  const HTCommon& c = p.c;
  const HTLayout& l = c.layout;
  const int R = c.nRanks;
  const int lane = threadIdx.x & 31;
  const uint32_t epoch = seq + 1;
  const bool ok = ht::waitPeersFree(peers, c, seq, kPhaseHTCachedSend);
  if (ok && blockIdx.x == 0) {
    ht::sendHeader(peers, c, t, p.numTokens, epoch, p.rejectCode);
    ht::signalChunksAhead(peers, c, t, p.numTokens);
  }

  const int warps = c.sendBlocks * kHTWarps;
  if (ok && p.rejectCode != 0) {
    const uint64_t flag = (uint64_t(epoch) << 32) | rejectWord(p.rejectCode);
    for (int k = 0; k < t.S; ++k)
      ht::storeRejectFlags(l, peers.net.lsa.peerBase(t.node * t.S + k), c.rank, flag,
                           blockIdx.x * kHTWarps + (threadIdx.x >> 5), warps, lane);
  }
  for (int b = blockIdx.x * kHTWarps + (threadIdx.x >> 5); ok && b < p.numTokens; b += warps) {
    const int slot = lane < R ? p.sendPos[int64_t(b) * R + lane] : -1;
    const char* row = static_cast<const char*>(p.x) + int64_t(b) * p.rowBytes;
    const bool near = slot >= 0 && t.nodeOf(lane) == t.node;
    char* msg = near ? peers.net.lsa.template peerPtr<char>(lane, ht::slotAt(l, c.rank, slot)) : nullptr;
    for (uint32_t m = __ballot_sync(kFull, near); m != 0; m &= m - 1) {
      char* dst = reinterpret_cast<char*>(__shfl_sync(kFull, reinterpret_cast<uintptr_t>(msg), __ffs(m) - 1));
      ht::warpCopyBytes<false>(dst, row, p.rowBytes, lane);
    }
    __syncwarp();
    if (near) device::storeRelease(reinterpret_cast<uint64_t*>(msg + l.flagOffset), (uint64_t(epoch) << 32) | uint32_t(b));

    if (__any_sync(kFull, slot >= 0 && !near)) {
      ht::warpCopyBytes<false>(c.local + ht::netStageAt(l, b), row, p.rowBytes, lane);
      ht::putToForwarders(peers, c, t, epoch, b, slot);
    }
    ht::tokenSent(peers, c, t, b, p.numTokens, lane);
  }
}

template <class Net>
__global__ void __launch_bounds__(kHTThreads, 1) htInternodeCachedKernel(const __grid_constant__ HTCachedParams p) {
  __shared__ Shared s;
  const HTCommon& c = p.c;
  const transport::Peers<Net> peers = transport::makePeers<Net>(c, {c.layout.netSignals, c.nRanks});
  const ht::Topo t = ht::topo(c);
  const uint32_t seq = ht::callSeq(c);
  const int block = blockIdx.x;
  if (block < c.sendBlocks) {
    sendRole(peers, p, t, seq);
  } else if (block < c.sendBlocks + c.forwardBlocks) {
    // a rejecting rank does not know the call's row size: it moves the largest row
    const int bytes = p.rejectCode != 0 ? int(c.layout.flagOffset) : p.rowBytes;
    ht::forwardRole<Net, false>(peers, c, t, seq, s.tokens, s.rejects, bytes, 0);
  } else if (p.rejectCode == 0) {
    const int first = c.sendBlocks + c.forwardBlocks;
    ht::receiveCachedRows(p, (block - first) * kHTWarps + (threadIdx.x >> 5), (gridDim.x - first) * kHTWarps, seq + 1);
  }
  ht::finishInternode(peers, c, seq, ht::kCallCached, &s.last);
}

}  // namespace

int launchHTInternodeCached(const HTCachedParams& p, int numBlocks, cudaStream_t stream) {
  return ht::launchOnTransport(p, htInternodeCachedKernel<transport::NetGin>, htInternodeCachedKernel<transport::NetEmulated>,
                               numBlocks, stream);
}

}  // namespace ncclep
