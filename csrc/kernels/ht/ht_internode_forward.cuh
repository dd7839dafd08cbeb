// Forward role of the internode dispatch and cached dispatch: once every peer finished the
// previous call (waitPeersFree) and each source's header landed (waitSources), the network
// messages a forwarder receives from the source on each other node are fanned out over NVLink (LSA)
// into the slots of the ranks of our node that hold the token, as if the source had stored them
// itself. Pipelined: a warp takes up a token as soon as the kHTSigChunk signal of its chunk landed
// (ht_internode.cuh), while the source still sends later chunks.
//
// A message in netRecv[n][b] belongs to this call when its token word carries the call's epoch
// (the source put it, and the chunk's signal, acquired by the warp's lane 0 before the warp reads
// the message, covers the put). For each rank d of our node with send_pos[b, d] = j >= 0, the warp
// writes slot (source, j) of d's slots region: the payload (and, for dispatch, the metadata
// relative to d: local expert id or -1, position, weight), then the slot's flag (epoch << 32 | b)
// with release semantics, which is what d's receive role polls, exactly as for a source on d's
// own node.
//
// Send side of the same streams (putToForwarders, tokenSent): a source puts each token's message
// to its forwarder on every node that needs it, then arrives on the token's chunk; the warp that
// completes a chunk signals it to every forwarder (chunks past the source's tokens are signalled
// empty by block 0, signalChunksAhead).
//
// A source that rejected a cached dispatch sends no message: its forwarders store its reject flag
// in every slot of its row at each rank of their node instead (a rejected dispatch needs nothing
// here: its counts carry the rejection and announce no token).
#pragma once

#include <cstdint>

#include "common/memory_order.cuh"
#include "common/reject.h"
#include "kernels/ht/ht_common.cuh"
#include "kernels/ht/ht_internode.cuh"
#include "kernels/ht/ht_messages.cuh"

namespace ncclep {
namespace ht {

// kMeta: dispatch (payload of `bytes`, a multiple of 16, then metadata); else cached dispatch
// (a row of `bytes`, any count). `topk`: the dispatch's top-k. `tokens`, `rejects`: shared,
// [kHTMaxRanks].
template <class Net, bool kMeta>
__device__ void forwardRole(const transport::Peers<Net>& peers, const HTCommon& c, const Topo& t, uint32_t seq,
                            int* tokens, int* rejects, int bytes, int topk) {
  if (!waitPeersFree(peers, c, seq, kPhaseHTForward)) return;
  waitSources(peers, c, t, seq, tokens, kMeta ? nullptr : rejects);
  const HTLayout& l = c.layout;
  const int R = c.nRanks;
  const int lane = threadIdx.x & 31;
  const int w = (int(blockIdx.x) - c.sendBlocks) * kHTWarps + (threadIdx.x >> 5);
  const int warps = c.forwardBlocks * kHTWarps;
  const uint32_t epoch = seq + 1;

  if (!kMeta) {
    for (int n = 0; n < t.N; ++n) {
      if (n == t.node || rejects[n] == 0) continue;
      const uint64_t flag = (uint64_t(epoch) << 32) | rejectWord(rejects[n]);
      for (int k = 0; k < t.S; ++k)
        storeRejectFlags(l, peers.net.lsa.peerBase(t.node * t.S + k), t.sourceOn(n), flag, w, warps, lane);
    }
  }
  int acquired = -1;  // the (chunk, node) whose signal this warp acquired last
  forEachForwardedToken(t, l, tokens, w, warps, [&](int n, int b) {
    if (!kMeta && rejects[n] != 0) return true;  // sends no message (its header announces none)
    const int src = t.sourceOn(n);
    const int key = chunkOf(l, b) * t.N + n;
    if (key != acquired) {
      bool ok = true;
      if (lane == 0) ok = waitChunk(peers, c, src, chunkOf(l, b), seq, kPhaseHTForward);
      if (!__shfl_sync(kFull, ok, 0)) return false;
      __syncwarp();  // lane 0 acquired the chunk: its messages are visible to the warp
      acquired = key;
    }
    if (device::hasError(sink(c))) return false;
    const char* msg = c.local + netRecvAt(l, n, b);
    const uint64_t tag = __ldcg(reinterpret_cast<const unsigned long long*>(msg + l.netTokenOffset));
    if (uint32_t(tag >> 32) != epoch) return true;  // not sent to our node this call
    int slot = -1;
    if (lane < R && t.nodeOf(lane) == t.node) slot = __ldcg(reinterpret_cast<const int*>(msg + l.flagOffset) + lane);
    const uint32_t dests = __ballot_sync(kFull, slot >= 0);
    char* dst = slot >= 0 ? peers.net.lsa.template peerPtr<char>(lane, slotAt(l, src, slot)) : nullptr;
    if (kMeta) {
      warpFanout16<true>(dst, dests, reinterpret_cast<const int4*>(msg), bytes / 16, lane);
      Choice choice;
      if (lane < topk) choice = Choice::load(msg, l, lane);
      for (uint32_t m = dests; m != 0; m &= m - 1) {
        const int d = __ffs(m) - 1;
        char* out = reinterpret_cast<char*>(__shfl_sync(kFull, reinterpret_cast<uintptr_t>(dst), d));
        if (lane < topk) choice.on(d, l).store(out, l, lane);
      }
    } else {
      for (uint32_t m = dests; m != 0; m &= m - 1) {
        char* out = reinterpret_cast<char*>(__shfl_sync(kFull, reinterpret_cast<uintptr_t>(dst), __ffs(m) - 1));
        warpCopyBytes<true>(out, msg, bytes, lane);
      }
    }
    __syncwarp();
    if (slot >= 0) device::storeRelease(reinterpret_cast<uint64_t*>(dst + l.flagOffset), (uint64_t(epoch) << 32) | uint32_t(b));
    return true;
  });
}

// Send role, block 0 (after sendHeader): our stream's chunks past our `numTokens` tokens, signalled
// empty to each of our forwarders.
template <class Net>
__device__ __forceinline__ void signalChunksAhead(const transport::Peers<Net>& peers, const HTCommon& c,
                                                  const Topo& t, int numTokens) {
  for (int m = 0; m < t.N; ++m)
    if (m != t.node) signalEmptyChunks(peers, c.layout, t.forwarder(c.rank, m), numTokens);
}

// Send role, after the warp's stores and puts of token b (every token, sent across or not): the
// warp that completes b's chunk signals it to each of our forwarders (lane 0: over GIN, the lane
// that issued the warp's puts).
template <class Net>
__device__ __forceinline__ void tokenSent(const transport::Peers<Net>& peers, const HTCommon& c, const Topo& t, int b,
                                          int numTokens, int lane) {
  if (arriveChunk(c, t.node, b, numTokens, lane) && lane == 0)
    for (int m = 0; m < t.N; ++m)
      if (m != t.node) peers.signal(t.forwarder(c.rank, m), kHTSigChunk + chunkOf(c.layout, b), 1);
}

// Send role, one token: the network message of token b (its row, written by the caller at the
// staging offset, then here its send_pos row and token word) put to the forwarder of every other
// node that holds one of its experts. `slot` is lane d's send_pos[b, d] (lanes >= R: -1).
template <class Net>
__device__ __forceinline__ void putToForwarders(const transport::Peers<Net>& peers, const HTCommon& c, const Topo& t,
                                                 uint32_t epoch, int b, int slot) {
  const HTLayout& l = c.layout;
  const int lane = threadIdx.x & 31;
  char* msg = c.local + netStageAt(l, b);
  if (lane < c.nRanks) reinterpret_cast<int*>(msg + l.flagOffset)[lane] = slot;
  if (lane == 0) *reinterpret_cast<uint64_t*>(msg + l.netTokenOffset) = (uint64_t(epoch) << 32) | uint32_t(b);
  const bool remote = slot >= 0 && t.nodeOf(lane) != t.node;
  const uint32_t nodes = __reduce_or_sync(kFull, remote ? 1u << t.nodeOf(lane) : 0u);
  __syncwarp();  // the message is complete before any lane copies it (emulation) or lane 0 puts it
  for (uint32_t m = nodes; m != 0; m &= m - 1) {
    const int node = __ffs(m) - 1;
    peers.put(t.forwarder(c.rank, node), netRecvAt(l, t.node, b), netStageAt(l, b), l.netMsgBytes, lane, 32);
  }
}

}  // namespace ht
}  // namespace ncclep
