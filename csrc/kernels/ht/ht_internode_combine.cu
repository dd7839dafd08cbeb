// HT combine across (virtual) nodes: the dispatch's route backwards, reduced at the forwarder.
// Roles (see ht_internode.cuh):
//
// Send (expert side), after waitPeersFree:
//   1. block 0, for each other node m: stages infoStage[m][b][k] = send_pos[b, m * S + k] (the
//      slot token b has at each rank of m, -1 if none), puts it to our forwarder on m
//      (combineFwd infoIn[our node] there) with our header, then (same thread as the puts)
//      signals kHTSigHeader +1 to it.
//   2. warps spread over the sources: for each received slot (source, j), the fp32 sum of its rows
//      (ascending row order), one bf16 row (and the per-choice sums of the rows' weights) with
//      the flag (epoch << 32 | j): for a source on our node into slot (us, j) of its window, as the
//      intranode combine; for a source on node n != ours, into slot (n * S + our local index, j)
//      of our node's forwarder for that source (that slot row is never used by the forwarder as a
//      token owner: rows of other nodes' ranks hold nothing in a hierarchical combine).
// Forward, for the source on each other node n: waits for its header and info (kHTSigHeader);
//   the first forward block signals the chunks past the source's tokens (empty) to it. Warps take
//   the tokens chunk by chunk (forEachForwardedToken): a warp per token b with a slot at one of
//   our ranks k waits for the flags of slots (n * S + k, j_k) in our window, sums them in k order
//   (fp32), stages one bf16 row (+ weights) at backStage[n][b] and puts it into the source's
//   backIn[our node][b]; then (every token, with a slot here or not) it arrives on b's chunk, and
//   the warp that completes the chunk signals it (kHTSigChunk + c) to the source. So the owner
//   takes up a chunk while the forwarder still reduces later ones.
// Receive (token owner): a warp per token sums, in node order, the partial rows of our node's
//   ranks (their slots (d, j) in our window, rank order, each waited by its flag) and each other
//   node's reduced row (backIn, waited by the chunk signal of that node's forwarder: lane m * S
//   acquires chunk c of node m once per warp), in fp32, and writes bf16. The reference sums per
//   rank in rank order; here the ranks of another node are summed first at their forwarder and
//   rounded to bf16 once: the result matches within bf16 rounding, not bit for bit. Weight sums
//   are exact (one rank per choice).
//
// A rank that rejected the call sends its header with zero tokens, no info and no partial: it
// stores its reject flag in every slot of the rows its partials would use at each rank of its node
// (row n * S + its local index, for every node n: its own node's owners, and the forwarders for
// each other node). A forwarder drops a rejected partial from its sum and puts the rejecting rank
// and reason (reject word) in the back row's status word, which the owner reads with the row: the
// row, a sum of the other ranks' partials, still counts; the rejection is recorded. An owner drops
// a rejected partial of its own node. The rejecting rank's receive role does nothing: its header
// announced no token, so its forwarders put it no row and signal every chunk empty.
#include <cstddef>

#include "common/device_error.cuh"
#include "common/memory_order.cuh"
#include "common/reject.h"
#include "kernels/ht/ht_common.cuh"
#include "kernels/ht/ht_internode.cuh"
#include "kernels/ht/ht_messages.cuh"
#include "kernels/ht/ht_params.h"

namespace ncclep {
namespace {

using ht::kFull;

struct Shared {
  int tokens[kHTMaxRanks];
  bool last;
};

// A back row (forwarder -> owner): the payload, the weight sums, then a status word: 0, or the
// reject word (reject.h) of a rank whose partial the forwarder left out. Its bytes, and where the
// status word is.
__device__ __forceinline__ size_t backBytes(const HTLayout& l) {
  return l.payloadBytes + (size_t(l.maxTopk) * 4 + 4 + 15) / 16 * 16;
}
__device__ __forceinline__ size_t backStatusAt(const HTLayout& l) { return l.payloadBytes + size_t(l.maxTopk) * 4; }

template <class Net>
__device__ void sendInfo(const transport::Peers<Net>& peers, const HTCombineParams& p, const ht::Topo& t,
                         uint32_t epoch) {
  const HTCommon& c = p.c;
  const HTLayout& l = c.layout;
  const int R = c.nRanks, S = t.S;
  for (int m = 0; m < t.N; ++m) {
    if (m == t.node) continue;
    int* info = reinterpret_cast<int*>(c.local + l.netStage + size_t(m) * l.infoStride);
    for (int i = threadIdx.x; i < p.numTokens * S; i += blockDim.x)
      info[i] = p.sendPos[int64_t(i / S) * R + m * S + i % S];
  }
  __syncthreads();
  const size_t bytes = (size_t(p.numTokens) * S * 4 + 15) / 16 * 16;
  for (int m = 0; m < t.N; ++m) {
    if (m == t.node || bytes == 0) continue;
    peers.put(t.forwarder(c.rank, m), l.combineFwd + size_t(t.node) * l.infoStride, l.netStage + size_t(m) * l.infoStride,
               bytes, threadIdx.x, blockDim.x);
  }
  ht::sendHeader(peers, c, t, p.numTokens, epoch, p.rejectCode);  // its signal covers the info too
}

template <class Net>
__device__ void sendRole(const transport::Peers<Net>& peers, const HTCombineParams& p, const ht::Topo& t,
                         uint32_t seq) {
  const HTCommon& c = p.c;
  const HTLayout& l = c.layout;
  const int R = c.nRanks, T = l.maxTokens;
  const int lane = threadIdx.x & 31;
  const uint32_t epoch = seq + 1;
  if (!ht::waitPeersFree(peers, c, seq, kPhaseHTCombineSend)) return;
  if (blockIdx.x == 0) sendInfo(peers, p, t, epoch);
  if (p.rejectCode != 0) {
    const uint64_t flag = (uint64_t(epoch) << 32) | rejectWord(p.rejectCode);
    const int w = blockIdx.x * kHTWarps + (threadIdx.x >> 5), warps = c.sendBlocks * kHTWarps;
    for (int k = 0; k < t.S; ++k)
      for (int n = 0; n < t.N; ++n)
        ht::storeRejectFlags(l, peers.net.lsa.peerBase(t.node * t.S + k), n * t.S + t.local, flag, w, warps, lane);
    return;
  }

  const ht::StreamShare share =
      ht::shareStreams(blockIdx.x * kHTWarps + (threadIdx.x >> 5), c.sendBlocks * kHTWarps, R);
  for (int owner = share.first; owner < R; owner += share.step) {
    const int messages = p.recvCounts[owner];
    const bool near = t.nodeOf(owner) == t.node;
    // Our node: the owner itself; another node: our node's forwarder for the owner.
    const int to = near ? owner : t.forwarder(owner, t.node);
    const int slotRow = near ? c.rank : t.nodeOf(owner) * t.S + t.local;
    for (int j = share.h; j < messages; j += share.helpers) {
      char* msg = peers.net.lsa.template peerPtr<char>(to, ht::slotAt(l, slotRow, j));
      ht::writeCombineMessage(p, msg, owner * T + j, lane);
      __syncwarp();
      if (lane == 0) device::storeRelease(reinterpret_cast<uint64_t*>(msg + l.flagOffset), (uint64_t(epoch) << 32) | uint32_t(j));
    }
  }
}

template <class Net>
__device__ void forwardRole(const transport::Peers<Net>& peers, const HTCombineParams& p, const ht::Topo& t,
                            uint32_t seq, Shared& s) {
  const HTCommon& c = p.c;
  const HTLayout& l = c.layout;
  const int T = l.maxTokens, S = t.S;
  const int lane = threadIdx.x & 31;
  const int w = (int(blockIdx.x) - c.sendBlocks) * kHTWarps + (threadIdx.x >> 5);
  const int warps = c.forwardBlocks * kHTWarps;
  const uint32_t epoch = seq + 1;
  // A rejecting rank knows neither the call's hidden size nor its top-k: it sums the whole payload
  // area and every choice (the owners read only theirs).
  const int vectors = p.rejectCode != 0 ? int(l.payloadBytes / 16) : p.hidden / 8;
  const int topk = p.rejectCode != 0 ? l.maxTopk : p.topk;

  if (!ht::waitPeersFree(peers, c, seq, kPhaseHTForward)) return;
  ht::waitSources(peers, c, t, seq, s.tokens);
  if (blockIdx.x == c.sendBlocks && !device::hasError(ht::sink(c)))
    for (int n = 0; n < t.N; ++n)
      if (n != t.node) ht::signalEmptyChunks(peers, l, t.sourceOn(n), s.tokens[n]);
  ht::forEachForwardedToken(t, l, s.tokens, w, warps, [&](int n, int b) {
    const int* info = reinterpret_cast<const int*>(c.local + l.combineFwd + size_t(n) * l.infoStride);
    const int j = lane < S ? __ldcg(info + int64_t(b) * S + lane) : -1;
    const uint32_t from = __ballot_sync(kFull, j >= 0);
    if (from != 0) {  // else the token has no expert on our node: nothing to put, it only arrives
      const char* msg = j >= 0 ? ht::slotPtr(c.local, l, n * S + lane, j) : nullptr;
      bool ok = true, rejected = false;
      uint64_t flag = 0;
      if (j >= 0) {
        ok = ht::waitEpoch(reinterpret_cast<const uint64_t*>(msg + l.flagOffset), epoch, &flag, c, kPhaseHTForward,
                           t.node * S + lane);
        rejected = ok && isRejectWord(uint32_t(flag));  // the owner records it, from the status word
      }
      if (!__all_sync(kFull, ok)) return false;
      __syncwarp();  // each partial's flag was acquired by its lane
      const uint32_t kept = __ballot_sync(kFull, j >= 0 && !rejected);
      const uint32_t dropped = __ballot_sync(kFull, rejected);
      const int first = dropped != 0 ? __ffs(dropped) - 1 : 0;
      const uint32_t firstFlag = __shfl_sync(kFull, uint32_t(flag), first);
      const size_t stage = l.combineFwd + l.backOffset + (size_t(n) * T + size_t(b)) * l.msgBytes;
      char* out = c.local + stage;
      ht::warpSumRows<true>(reinterpret_cast<int4*>(out), reinterpret_cast<const int4*>(msg), kept, vectors, lane);
      const float weight = ht::warpSumWeights(msg, kept, int(l.payloadBytes), topk, lane);
      if (lane < topk) reinterpret_cast<float*>(out + l.payloadBytes)[lane] = weight;
      if (lane == 0)
        *reinterpret_cast<uint32_t*>(out + backStatusAt(l)) =
            dropped != 0 ? rejectWord(rejectReason(firstFlag), t.node * S + first) : 0u;
      __syncwarp();
      peers.put(t.sourceOn(n), l.netStage + l.backOffset + (size_t(t.node) * T + size_t(b)) * l.msgBytes, stage, backBytes(l),
                lane, 32);
    }
    // lane 0: over GIN, the lane that issued the warp's puts
    if (ht::arriveChunk(c, n, b, s.tokens[n], lane) && lane == 0)
      peers.signal(t.sourceOn(n), kHTSigChunk + ht::chunkOf(l, b), 1);
    return true;
  });
}

template <class Net>
__device__ void recvRole(const transport::Peers<Net>& peers, const HTCombineParams& p, const ht::Topo& t,
                         uint32_t seq) {
  const HTCommon& c = p.c;
  const HTLayout& l = c.layout;
  const int R = c.nRanks, K = p.topk, T = l.maxTokens, S = t.S;
  const int lane = threadIdx.x & 31;
  const int first = c.sendBlocks + c.forwardBlocks;
  const int warps = (gridDim.x - first) * kHTWarps;
  const int w = (int(blockIdx.x) - first) * kHTWarps + (threadIdx.x >> 5);
  const uint32_t epoch = seq + 1;
  const uint32_t nodeLanes = S >= 32 ? kFull : (1u << S) - 1;
  if (p.rejectCode != 0) return;

  int4* out = static_cast<int4*>(p.out);
  bool reported = false;  // this lane recorded a rejection (once per warp and lane)
  int acquired = -1;      // lane m * S of another node m: the chunk of m's stream it acquired last
  for (int b = w; b < p.numTokens; b += warps) {
    const int slot = lane < R ? p.sendPos[int64_t(b) * R + lane] : -1;
    const uint32_t dests = __ballot_sync(kFull, slot >= 0);
    // Lane d of our node: d's partial in our slots; lane m * S of another node m: m's reduced row.
    const char* msg = nullptr;
    if (lane < R && t.nodeOf(lane) == t.node) {
      if (slot >= 0) msg = ht::slotPtr(c.local, l, lane, slot);
    } else if (lane < R && lane % S == 0 && ((dests >> lane) & nodeLanes) != 0) {
      msg = c.local + l.netStage + l.backOffset + (size_t(t.nodeOf(lane)) * T + size_t(b)) * l.msgBytes;
    }
    bool ok = true, dropped = false;
    if (msg != nullptr && t.nodeOf(lane) != t.node && ht::chunkOf(l, b) != acquired) {
      acquired = ht::chunkOf(l, b);
      ok = ht::waitChunk(peers, c, t.forwarder(c.rank, t.nodeOf(lane)), acquired, seq, kPhaseHTCombineRecv);
    }
    if (msg != nullptr && t.nodeOf(lane) == t.node) {
      uint64_t flag = 0;
      ok = ht::waitEpoch(reinterpret_cast<const uint64_t*>(msg + l.flagOffset), epoch, &flag, c, kPhaseHTCombineRecv,
                         lane);
      // a rank of our node that rejected the call: its partial counts as none
      dropped = ok && ht::peerRejected(c, uint32_t(flag), kPhaseHTCombineRecv, lane, !reported);
      reported = reported || dropped;
    } else if (msg != nullptr && ok) {
      // another node's row: its forwarder left out a rank that rejected the call and says which
      const uint32_t status = __ldcg(reinterpret_cast<const uint32_t*>(msg + backStatusAt(l)));
      const bool rejected = ht::peerRejected(c, status, kPhaseHTCombineRecv, rejectPeer(status), !reported);
      reported = reported || rejected;
    }
    if (!__all_sync(kFull, ok)) return;
    __syncwarp();  // each partial's flag (or its node's chunk signal) was acquired
    const uint32_t from = __ballot_sync(kFull, msg != nullptr && !dropped);  // ascending lanes: node order
    ht::warpSumRows<true>(out + int64_t(b) * (p.hidden / 8), reinterpret_cast<const int4*>(msg), from, p.hidden / 8, lane);
    if (p.outWeights != nullptr) {
      const float weight = ht::warpSumWeights(msg, from, int(l.payloadBytes), K, lane);
      if (lane < K) p.outWeights[int64_t(b) * K + lane] = weight;
    }
  }
}

template <class Net>
__global__ void __launch_bounds__(kHTThreads, 1) htInternodeCombineKernel(const __grid_constant__ HTCombineParams p) {
  __shared__ Shared s;
  const HTCommon& c = p.c;
  const transport::Peers<Net> peers = transport::makePeers<Net>(c, {c.layout.netSignals, c.nRanks});
  const ht::Topo t = ht::topo(c);
  const uint32_t seq = ht::callSeq(c);
  const int block = blockIdx.x;
  if (block < c.sendBlocks) sendRole(peers, p, t, seq);
  else if (block < c.sendBlocks + c.forwardBlocks) forwardRole(peers, p, t, seq, s);
  else recvRole(peers, p, t, seq);
  ht::finishInternode(peers, c, seq, ht::kCallCombine, &s.last);
}

}  // namespace

int launchHTInternodeCombine(const HTCombineParams& p, int numBlocks, cudaStream_t stream) {
  const int e = launchHTCombinePrepare(p, numBlocks, stream);
  if (e != 0) return e;
  return ht::launchOnTransport(p, htInternodeCombineKernel<transport::NetGin>, htInternodeCombineKernel<transport::NetEmulated>,
                               numBlocks, stream);
}

}  // namespace ncclep
