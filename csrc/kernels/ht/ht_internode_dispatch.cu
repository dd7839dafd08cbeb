// HT dispatch across (virtual) nodes, after the layout kernel (which, with c.hier, leaves its
// column totals in `totals`). Roles (see ht_internode.cuh for the route, signals and reuse):
//
// Send (blocks [0, sendBlocks)), after waitPeersFree:
//   1. block 0 sends every rank d our counts for it (int32 per local expert of d, then tokens
//      for d) into netCounts[us] of d's window: stored directly on our node, staged and put
//      across the network; then kHTSigCounts +1 to each d (the signal covers the counts). It
//      also puts our header (tokens, epoch) to each of our forwarders (kHTSigHeader).
//   2. a warp per token: for ranks of our node, exactly the intranode store (payload, metadata
//      relative to d, flag) into slot send_pos[b, d] of our row of d's slots; if ranks of other
//      nodes hold the token, one network message (payload, global metadata, send_pos row, token
//      word) staged at netStage[b] and put once per such node, to our forwarder there; then the
//      warp arrives on the token's chunk, and the warp that completes a chunk signals it
//      (kHTSigChunk + c) to each forwarder. Block 0 signals the chunks past our tokens at once.
// Forward (the next forwardBlocks blocks): waits for each other node's source's header
//   (kHTSigHeader), then fans its messages out over LSA into our node's slots chunk by chunk, as
//   each chunk's signal lands (ht_internode_forward.cuh).
// Receive (the rest): waits for every source's counts (kHTSigCounts), then places every message
//   exactly as the intranode receive does; messages from other nodes were written by our node's
//   forwarder for their source, with the same format and flag.
//
// A rank that rejected the call sends its counts with its reject word as the token total (the
// receivers record it and take no token from it), a header of zero tokens, and no message; its
// receive role waits for the counts signals (they cover puts into our window) and writes nothing.
#include <cstddef>

#include "common/device_error.cuh"
#include "common/expert_ids.cuh"
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
  ht::RecvPlan plan;
  int tokens[kHTMaxRanks];  // forward: tokens of the source on each node
  bool last;
};

template <class Net>
__device__ void sendCounts(const transport::Peers<Net>& peers, const HTDispatchParams& p) {
  const HTCommon& c = p.c;
  const HTLayout& l = c.layout;
  const int R = c.nRanks, L = l.numLocalExperts;
  const int* totals = reinterpret_cast<const int*>(c.local + l.totals);
  const size_t dstOffset = l.netCounts + size_t(c.rank) * l.countBytes;
  for (int i = threadIdx.x; i < R * (L + 1); i += blockDim.x) {
    const int d = i / (L + 1), e = i % (L + 1);
    int* entry = peers.template target<int>(d, dstOffset, l.countStage + size_t(d) * l.countBytes);
    entry[e] = e < L               ? __ldcg(totals + R + d * L + e)
               : p.rejectCode != 0 ? int(rejectWord(p.rejectCode))
                                   : __ldcg(totals + d);
  }
  __syncthreads();
  for (int d = 0; d < R; ++d)
    peers.put(d, dstOffset, l.countStage + size_t(d) * l.countBytes, l.countBytes, threadIdx.x, blockDim.x);
  __syncthreads();
  // The thread that issued the puts (thread 0 for GIN) signals: the signal is ordered after them.
  if (threadIdx.x == 0)
    for (int d = 0; d < R; ++d) peers.signal(d, kHTSigCounts, 1);
}

template <class Net>
__device__ void sendRole(const transport::Peers<Net>& peers, const HTDispatchParams& p, const ht::Topo& t,
                         uint32_t seq) {
  const HTCommon& c = p.c;
  const HTLayout& l = c.layout;
  const int R = c.nRanks, K = p.topk;
  const int lane = threadIdx.x & 31;
  const uint32_t epoch = seq + 1;
  const bool ok = ht::waitPeersFree(peers, c, seq, kPhaseHTDispatchSend);
  if (ok && blockIdx.x == 0) {
    sendCounts(peers, p);
    ht::sendHeader(peers, c, t, p.numTokens, epoch, p.rejectCode);
    ht::signalChunksAhead(peers, c, t, p.numTokens);
  }

  const int vectors = p.rowBytes / 16;
  for (ht::TokenClaims claims(c, lane); ok && claims.current() < p.numTokens; claims.advance()) {
    const int b = claims.current();
    claims.start(p.x, p.rowBytes, p.numTokens);
    const ht::Choice choice = ht::tokenChoice(p, b, lane);
    const int slot = lane < R ? p.sendPos[int64_t(b) * R + lane] : -1;
    // Ranks of our node: the intranode message, straight into their slots.
    const bool near = slot >= 0 && t.nodeOf(lane) == t.node;
    const uint32_t dests = __ballot_sync(kFull, near);
    char* mine = near ? peers.net.lsa.template peerPtr<char>(lane, ht::slotAt(l, c.rank, slot)) : nullptr;
    ht::writeDispatchMessages(p, mine, dests, b, choice, epoch, lane);

    // Other nodes: one network message, put to our forwarder on each node that needs it.
    if (__any_sync(kFull, slot >= 0 && !near)) {
      const int4* row = reinterpret_cast<const int4*>(static_cast<const char*>(p.x) + int64_t(b) * p.rowBytes);
      const char* scales = static_cast<const char*>(p.xScales) + int64_t(b) * p.scaleRowBytes;
      char* msg = c.local + ht::netStageAt(l, b);
      ht::warpCopy16<false>(reinterpret_cast<int4*>(msg), row, vectors, lane);
      if (p.scaleRowBytes) ht::warpCopyBytes<false>(msg + p.rowBytes, scales, p.scaleRowBytes, lane);
      // Global experts; a choice without one carries no weight.
      const float weight = choice.expert >= 0 ? choice.weight : 0.0f;
      if (lane < K) ht::Choice{choice.expert, choice.pos, weight}.store(msg, l, lane);
      ht::putToForwarders(peers, c, t, epoch, b, slot);
    }
    ht::tokenSent(peers, c, t, b, p.numTokens, lane);
  }
}

template <class Net>
__device__ void recvRole(const transport::Peers<Net>& peers, const HTDispatchParams& p, uint32_t seq, ht::RecvPlan& s) {
  const HTCommon& c = p.c;
  const HTLayout& l = c.layout;
  const int R = c.nRanks, L = l.numLocalExperts;
  const int lane = threadIdx.x & 31;
  const int first = c.sendBlocks + c.forwardBlocks;
  const int block = blockIdx.x - first, blocks = gridDim.x - first;
  const uint64_t countsMark = uint64_t(ht::state(c)->dispatches) + 1;
  auto counts = [&](int r) { return reinterpret_cast<const int*>(c.local + l.netCounts + size_t(r) * l.countBytes); };

  int tokens = 0;  // warp 0, lane r: tokens from source r, after its counts signal
  if (threadIdx.x < 32 && lane < R &&
      peers.wait(lane, kHTSigCounts, countsMark, c.timeoutNs, ht::sink(c), kPhaseHTDispatchRecv))
    tokens = __ldcg(counts(lane) + L);
  if (p.rejectCode != 0) return;
  if (ht::peerRejected(c, uint32_t(tokens), kPhaseHTDispatchRecv, lane, block == 0)) tokens = 0;
  ht::planRows(p, s, tokens, [&](int r, int e) { return __ldcg(counts(r) + e); }, block, blocks);
  ht::receiveDispatchMessages(p, s, block, blocks, seq + 1);
}

template <class Net>
__global__ void __launch_bounds__(kHTThreads, 1) htInternodeDispatchKernel(const __grid_constant__ HTDispatchParams p) {
  __shared__ Shared s;
  const HTCommon& c = p.c;
  const transport::Peers<Net> peers = transport::makePeers<Net>(c, {c.layout.netSignals, c.nRanks});
  const ht::Topo t = ht::topo(c);
  const uint32_t seq = ht::callSeq(c);
  const int block = blockIdx.x;
  if (block < c.sendBlocks) {
    sendRole(peers, p, t, seq);
  } else if (block < c.sendBlocks + c.forwardBlocks) {
    // Payload bytes: the row, then fp8 scales, rounded up to 16 (within payloadBytes).
    const bool known = p.rejectCode == 0;
    const int bytes = known ? (p.rowBytes + p.scaleRowBytes + 15) / 16 * 16 : int(c.layout.payloadBytes);
    ht::forwardRole<Net, true>(peers, c, t, seq, s.tokens, nullptr, bytes, known ? p.topk : c.layout.maxTopk);
  } else {
    recvRole(peers, p, seq, s.plan);
  }
  ht::finishInternode(peers, c, seq, ht::kCallDispatch, &s.last);
}

}  // namespace

int launchHTInternodeDispatch(const HTDispatchParams& p, int numBlocks, cudaStream_t stream) {
  return ht::launchOnTransport(p, htInternodeDispatchKernel<transport::NetGin>, htInternodeDispatchKernel<transport::NetEmulated>,
                               numBlocks, stream);
}

}  // namespace ncclep
