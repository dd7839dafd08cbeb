// HT dispatch across (virtual) nodes, after the layout kernels (which, with c.hier, leave their
// column totals in `totals`). Roles (see ht_internode.cuh for the route, signals and reuse):
//
// Send (blocks [0, sendBlocks)), after waitPeersFree:
//   1. block 0 sends every rank d our counts for it (int32 per local expert of d, then tokens
//      for d) into netCounts[us] of d's window: stored directly on our node, staged and put
//      across the network; then kHTSigCounts +1 to each d (the signal covers the counts). It
//      also puts our header (tokens, epoch) to each of our forwarders.
//   2. a warp per token: for ranks of our node, exactly the intranode store (payload, metadata
//      relative to d, flag) into slot send_pos[b, d] of our row of d's slots; if ranks of other
//      nodes hold the token, one network message (payload, global metadata, send_pos row, token
//      word) staged at netStage[b] and put once per such node, to our forwarder there.
//   3. the last send block to arrive signals kHTSigForward +1 to each forwarder.
// Forward (the next forwardBlocks blocks): waits for each other node's source (kHTSigForward),
//   then fans its messages out over LSA into our node's slots (ht_internode_forward.cuh).
// Receive (the rest): waits for every source's counts (kHTSigCounts), then places every message
//   exactly as the intranode receive does; messages from other nodes were written by our node's
//   forwarder for their source, with the same format and flag.
#include <cstddef>

#include "common/device_error.cuh"
#include "common/memory_order.cuh"
#include "kernels/ht/ht_common.cuh"
#include "kernels/ht/ht_internode.cuh"
#include "kernels/ht/ht_internode_forward.cuh"
#include "kernels/ht/ht_params.h"

namespace ncclep {
namespace {

using ht::kFull;

constexpr int kMaxLocalExperts = kHTMaxExperts / 2;

struct Shared {
  int srcOffset[kHTMaxExperts];  // [local expert][source]: rows of e from earlier sources
  int expertStart[kMaxLocalExperts];
  int expertCount[kMaxLocalExperts];
  int count[kHTMaxRanks];  // tokens from each source
  int start[kHTMaxRanks];  // flat: first row of each source
  int tokens[kHTMaxRanks];  // forward: tokens of the source on each node
  int used;
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
    entry[e] = e < L ? __ldcg(totals + R + d * L + e) : __ldcg(totals + d);
  }
  __syncthreads();
  for (int d = 0; d < R; ++d)
    peers.ship(d, dstOffset, l.countStage + size_t(d) * l.countBytes, l.countBytes, threadIdx.x, blockDim.x);
  __syncthreads();
  // The thread that issued the puts (thread 0 for GIN) signals: the signal is ordered after them.
  if (threadIdx.x == 0)
    for (int d = 0; d < R; ++d) ht::signalPeer(peers, c, d, kHTSigCounts, 1);
}

template <class Net>
__device__ void sendRole(const transport::Peers<Net>& peers, const HTDispatchParams& p, const ht::Topo& t,
                         uint32_t seq, Shared& s) {
  const HTCommon& c = p.c;
  const HTLayout& l = c.layout;
  const device::ErrorSink err = ht::sink(c);
  const int R = c.nRanks, L = l.numLocalExperts, K = p.topk, KM = l.maxTopk;
  const int lane = threadIdx.x & 31;
  const uint32_t epoch = seq + 1;
  const bool ok = ht::waitPeersFree(peers, c, seq, kPhaseHTDispatchSend);
  if (ok && blockIdx.x == 0) {
    sendCounts(peers, p);
    ht::sendHeader(peers, c, t, p.numTokens, epoch);
  }

  const int warps = c.sendBlocks * kHTWarps;
  const int* expertPos = reinterpret_cast<const int*>(c.local + l.expertPos);
  const int vectors = p.rowBytes / 16;
  for (int b = blockIdx.x * kHTWarps + (threadIdx.x >> 5); ok && b < p.numTokens; b += warps) {
    const int e = ht::warpTokenExpert(p.topkIdx, p.topkIdx64, b, K, c.numExperts, lane, false, err, 0);
    const float weight = (p.topkWeights != nullptr && lane < K) ? p.topkWeights[int64_t(b) * K + lane] : 0.0f;
    const int pos = e >= 0 ? expertPos[int64_t(b) * KM + lane] : 0;
    const int slot = lane < R ? p.sendPos[int64_t(b) * R + lane] : -1;
    const int4* row = reinterpret_cast<const int4*>(static_cast<const char*>(p.x) + int64_t(b) * p.rowBytes);
    const char* scales = static_cast<const char*>(p.xScales) + int64_t(b) * p.scaleRowBytes;

    // Ranks of our node: the intranode message, straight into their slots.
    const bool near = slot >= 0 && t.nodeOf(lane) == t.node;
    const uint32_t dests = __ballot_sync(kFull, near);
    char* mine = near ? peers.net.lsa.template peerPtr<char>(lane, ht::slotAt(l, c.rank, slot)) : nullptr;
    ht::warpFanout16<false>(mine, dests, row, vectors, lane);
    for (uint32_t m = dests; m != 0; m &= m - 1) {
      const int d = __ffs(m) - 1;
      char* msg = reinterpret_cast<char*>(__shfl_sync(kFull, reinterpret_cast<uintptr_t>(mine), d));
      if (p.scaleRowBytes) ht::warpCopyBytes<false>(msg + p.rowBytes, scales, p.scaleRowBytes, lane);
      if (lane < K) {
        const bool here = e >= 0 && e / L == d;
        int* meta = reinterpret_cast<int*>(msg + l.payloadBytes);
        meta[lane] = here ? e - d * L : -1;
        meta[KM + lane] = here ? pos : 0;
        reinterpret_cast<float*>(meta)[2 * KM + lane] = here ? weight : 0.0f;
      }
    }
    __syncwarp();
    if (near) device::storeRelease(reinterpret_cast<uint64_t*>(mine + l.flagOffset), (uint64_t(epoch) << 32) | uint32_t(b));

    // Other nodes: one network message, put to our forwarder on each node that needs it.
    if (__any_sync(kFull, slot >= 0 && !near)) {
      char* msg = c.local + ht::netStageAt(l, b);
      ht::warpCopy16<false>(reinterpret_cast<int4*>(msg), row, vectors, lane);
      if (p.scaleRowBytes) ht::warpCopyBytes<false>(msg + p.rowBytes, scales, p.scaleRowBytes, lane);
      if (lane < K) {
        int* meta = reinterpret_cast<int*>(msg + l.payloadBytes);
        meta[lane] = e;
        meta[KM + lane] = e >= 0 ? pos : 0;
        reinterpret_cast<float*>(meta)[2 * KM + lane] = e >= 0 ? weight : 0.0f;
      }
      ht::shipToForwarders(peers, c, t, epoch, b, slot);
    }
  }
  if (ht::arriveRole(c, 2, c.sendBlocks, &s.last)) ht::signalForwarders(peers, c, t);
}

// Rows no message lands on: topk_idx -1, weights 0, recv_slot -1 (as the intranode receive).
__device__ void fillUnusedRows(const HTDispatchParams& p, const Shared& s, int thread, int threads) {
  const int K = p.topk, L = p.c.layout.numLocalExperts;
  for (int64_t i = int64_t(s.used) * K + thread; i < int64_t(p.numRows) * K; i += threads) {
    p.recvTopkIdx[i] = -1;
    if (p.recvTopkWeights != nullptr) p.recvTopkWeights[i] = 0.0f;
  }
  for (int r = s.used + thread; r < p.numRows; r += threads) p.recvSlot[r] = -1;
  if (!p.expertMajor || p.alignment <= 1) return;
  const int pads = p.alignment - 1;
  for (int q = thread; q < L * pads; q += threads) {
    const int e = q / pads, i = q % pads;
    const int count = s.expertCount[e];
    const int padded = (count + p.alignment - 1) / p.alignment * p.alignment;
    if (count + i >= padded) continue;
    const int r = s.expertStart[e] + count + i;
    p.recvSlot[r] = -1;
    for (int k = 0; k < K; ++k) {
      p.recvTopkIdx[int64_t(r) * K + k] = -1;
      if (p.recvTopkWeights != nullptr) p.recvTopkWeights[int64_t(r) * K + k] = 0.0f;
    }
  }
}

template <class Net>
__device__ void recvRole(const transport::Peers<Net>& peers, const HTDispatchParams& p, uint32_t seq, Shared& s) {
  const HTCommon& c = p.c;
  const HTLayout& l = c.layout;
  const int R = c.nRanks, L = l.numLocalExperts, K = p.topk, KM = l.maxTopk, T = l.maxTokens;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int first = c.sendBlocks + c.forwardBlocks;
  const int block = blockIdx.x - first, blocks = gridDim.x - first;
  const uint32_t epoch = seq + 1;
  const uint64_t countsMark = uint64_t(ht::state(c)->dispatches) + 1;
  auto counts = [&](int r) { return reinterpret_cast<const int*>(c.local + l.netCounts + size_t(r) * l.countBytes); };

  if (warp == 0) {
    int n = 0;
    if (lane < R && ht::waitPeer(peers, c, lane, kHTSigCounts, countsMark, kPhaseHTDispatchRecv))
      n = __ldcg(counts(lane) + L);
    int incl = n;
    for (int o = 1; o < 32; o <<= 1) {
      const int up = __shfl_up_sync(kFull, incl, o);
      if (lane >= o) incl += up;
    }
    if (lane < R) {
      s.count[lane] = n;
      s.start[lane] = incl - n;
    }
    if (lane == 31) s.used = incl;
  }
  __syncthreads();
  for (int e = tid; e < L; e += blockDim.x) {
    int acc = 0;
    for (int r = 0; r < R; ++r) {
      s.srcOffset[e * R + r] = acc;
      acc += s.count[r] ? __ldcg(counts(r) + e) : 0;
    }
    s.expertCount[e] = acc;
  }
  __syncthreads();
  if (warp == 0) {  // segment starts: exclusive prefix of the aligned counts
    const int align = p.expertMajor ? p.alignment : 1;
    int carry = 0;
    for (int base = 0; base < L; base += 32) {
      const int e = base + lane;
      const int padded = e < L ? (s.expertCount[e] + align - 1) / align * align : 0;
      int incl = padded;
      for (int o = 1; o < 32; o <<= 1) {
        const int up = __shfl_up_sync(kFull, incl, o);
        if (lane >= o) incl += up;
      }
      if (e < L) s.expertStart[e] = carry + incl - padded;
      carry += __shfl_sync(kFull, incl, 31);
    }
    if (p.expertMajor && lane == 0) s.used = carry;
  }
  __syncthreads();
  if (block == 0) {
    for (int r = tid; r < R; r += blockDim.x) p.recvCounts[r] = s.count[r];
    for (int e = tid; e < L; e += blockDim.x) p.expertCounts[e] = s.expertCount[e];
    if (tid == 0) p.numRecv[0] = s.used;
  }
  fillUnusedRows(p, s, block * blockDim.x + tid, blocks * blockDim.x);

  const ht::StreamShare share = ht::shareStreams(block * kHTWarps + warp, blocks * kHTWarps, R);
  const int vectors = p.rowBytes / 16;
  bool ok = true;
  for (int src = share.first; ok && src < R; src += share.step) {
    for (int j = share.h; j < s.count[src]; j += share.helpers) {
      const char* msg = ht::slotPtr(c.local, l, src, j);
      uint64_t flag = 0;
      if (lane == 0)
        ok = ht::waitEpoch(reinterpret_cast<const uint64_t*>(msg + l.flagOffset), epoch, &flag, c,
                           kPhaseHTDispatchRecv, src);
      ok = __shfl_sync(kFull, ok, 0);
      if (!ok) break;
      __syncwarp();  // lane 0 acquired the flag: the message is visible to the warp
      int local = -1, pos = 0;
      float weight = 0.0f;
      if (lane < K) {
        const int* meta = reinterpret_cast<const int*>(msg + l.payloadBytes);
        local = __ldcg(meta + lane);
        pos = __ldcg(meta + KM + lane);
        weight = __ldcg(reinterpret_cast<const float*>(meta) + 2 * KM + lane);
      }
      int row;
      uint32_t targets;
      if (p.expertMajor) {
        const bool here = local >= 0 && local < L;
        row = here ? s.expertStart[local] + s.srcOffset[local * R + src] + pos : -1;
        targets = __ballot_sync(kFull, here);
      } else {
        row = s.start[src] + j;
        targets = 1u;
      }
      char* dst = row >= 0 ? static_cast<char*>(p.recvX) + int64_t(row) * p.rowBytes : nullptr;
      ht::warpFanout16<true>(dst, targets, reinterpret_cast<const int4*>(msg), vectors, lane);
      for (uint32_t m = targets; m != 0; m &= m - 1) {
        const int r = __shfl_sync(kFull, row, __ffs(m) - 1);
        if (p.scaleRowBytes)
          ht::warpCopyBytes<true>(static_cast<char*>(p.recvScales) + int64_t(r) * p.scaleRowBytes, msg + p.rowBytes,
                                  p.scaleRowBytes, lane);
        if (lane < K) {
          p.recvTopkIdx[int64_t(r) * K + lane] = local;
          if (p.recvTopkWeights != nullptr) p.recvTopkWeights[int64_t(r) * K + lane] = weight;
        }
        if (lane == 0) p.recvSlot[r] = src * T + j;
      }
    }
  }
}

template <class Net>
__global__ void __launch_bounds__(kHTThreads, 1) htInternodeDispatchKernel(const __grid_constant__ HTDispatchParams p) {
  __shared__ Shared s;
  const HTCommon& c = p.c;
  const transport::Peers<Net> peers = ht::makePeers<Net>(c);
  const ht::Topo t = ht::topo(c);
  const uint32_t seq = ht::callSeq(c);
  const int block = blockIdx.x;
  if (block < c.sendBlocks) {
    sendRole(peers, p, t, seq, s);
  } else if (block < c.sendBlocks + c.forwardBlocks) {
    if (ht::waitPeersFree(peers, c, seq, kPhaseHTForward)) {
      ht::waitSources(peers, c, t, seq, s.tokens);
      // Payload bytes: the row, then fp8 scales, rounded up to 16 (within payloadBytes).
      const int bytes = (p.rowBytes + p.scaleRowBytes + 15) / 16 * 16;
      ht::forwardMessages<Net, true>(peers, c, t, seq, s.tokens, bytes, p.topk);
    }
  } else {
    recvRole(peers, p, seq, s);
  }
  ht::finishInternode(peers, c, seq, ht::kCallDispatch, &s.last);
}

template <class Net>
int launch(const HTDispatchParams& p, int numBlocks, cudaStream_t stream) {
  htInternodeDispatchKernel<Net><<<numBlocks, kHTThreads, 0, stream>>>(p);
  return int(cudaGetLastError());
}

}  // namespace

int launchHTInternodeDispatch(const HTDispatchParams& p, int numBlocks, cudaStream_t stream) {
  return p.c.useGin ? launch<transport::NetGin>(p, numBlocks, stream)
                    : launch<transport::NetEmulated>(p, numBlocks, stream);
}

}  // namespace ncclep
