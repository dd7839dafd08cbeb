// The hierarchical HT path: protocol pieces shared by the internode dispatch, combine and cached
// dispatch kernels (ht_internode_*.cu). Used when the group spans several (virtual) nodes.
//
// Ranks form N nodes of S = nodeSize consecutive ranks. A token of source s crosses the network
// once per destination node m, to s's forwarder there, fwd(s, m) = m * S + s % S (the rank with
// the same local index), which forwards it over NVLink (LSA) to the ranks of m that hold one of
// its experts; combine runs the same route backwards and reduces at the forwarder. Everything
// that crosses nodes goes through transport::Peers<Net>: staged in our window, put, then covered
// by a signal (GIN on a cluster, emulated over LSA under NCCLEP_VIRTUAL_NODES).
//
// Every HT call is one call of the group's sequence (HTState.seq, identical on all ranks). The
// kernels split their blocks into three roles: send [0, sendBlocks), forward [sendBlocks,
// sendBlocks + forwardBlocks), receive (the rest); all blocks are co-resident (one per SM).
//
// Reuse of regions (why nothing is double-buffered): the send and forward roles of call `seq`
// first wait until every peer finished call seq - 1 (`waitPeersFree`): LSA peers of our node
// through their `done` word, peers on other nodes through their kHTSigDone signal (+1 per call).
// A peer finishes a call only after waiting for every signal that covers what we wrote into its
// window in that call, so its regions, and our staging copies its puts read, are free again.
//
// Signals (counters, monotonic; expected values are known to every rank because all make the
// same calls): kHTSigCounts +1 per dispatch (expected: HTState.dispatches + 1); kHTSigHeader +1
// per call from a source to each of its forwarders (seq + 1); kHTSigDone +1 per call; and per
// chunk c of a stream, kHTSigChunk + c, +1 per call (seq + 1) from the rank that sends the stream.
//
// Pipelined streams (chunks). The network hop and the NVLink hop overlap: a stream crossing the
// network (dispatch / cached: a source's messages to its forwarder; combine: a forwarder's reduced
// rows back to the token owner) is cut into chunks of chunkTokens consecutive token indexes, and
// the receiving side takes up chunk c as soon as its signal lands. Why it holds:
//   - Covering. The warps that work on a stream's tokens arrive, after each token (its puts
//     issued), on the chunk's entry of chunkArrivals (an acq_rel atomic after a warp barrier);
//     the warp whose arrival completes the chunk (it knows the chunk's token count) resets the
//     entry and its lane 0 signals the chunk. Every put of the chunk was issued before an arrival
//     that the signalling thread observed: the ordering contract of net.cuh (GIN orders the signal
//     after them; the emulation's signal is a release, cumulative over what that thread observed).
//   - Marks. A rank streams to each partner (the rank with its local index on each other node)
//     exactly once per call: as the source in a dispatch or cached dispatch, as the forwarder of
//     the partner's tokens in a combine (the relation is symmetric: fwd(fwd(s, m), node of s) = s).
//     Each stream adds exactly 1 to every chunk signal: chunks holding tokens when they complete,
//     the chunks past the stream's tokens ("empty") at once, from the role's first block. So the
//     mark of call seq is seq + 1 for every chunk, and a count >= seq + 1 means this call's signal
//     landed (with every earlier one): the next call's cannot come first, since its sender waits
//     (waitPeersFree) until we finished this call. A receiver waits only for the chunks that hold
//     its tokens (it knows their number from the header, or its own call), so a signal it did not
//     wait for may land after it finished: the counting still holds.
//   - Order. Senders take tokens in ascending order (dispatch: TokenClaims; cached: by index;
//     combine: as the expert side's partials land, in slot order, which is token order), so
//     chunks complete nearly in order, and the receiving warps walk them in order.
//
// A rank that rejected the call (ncclep.h, "Rejected calls") keeps every signal, and every wait
// that covers writes into its window (so the regions stay safe to reuse), but sends no token: zero
// tokens and its reason in its header (which a cached dispatch's forwarders turn into reject flags
// in the slots of its row at their node's ranks; every chunk of its stream, and of the combine
// stream back to it, is signalled empty), its reject word as its dispatch counts' token total, and
// reject flags where its combine rows would go. Its forward role forwards the other sources'
// messages as usual: it knows no payload size or top-k of the call, so it moves the whole payload
// area and every choice.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/device_error.cuh"
#include "common/memory_order.cuh"
#include "kernels/ht/ht_common.cuh"
#include "kernels/ht/ht_params.h"
#include "transport/peers.cuh"

namespace ncclep {
namespace ht {

enum HTCallKind : int { kCallDispatch = 0, kCallCombine = 1, kCallCached = 2 };

// Topology: nodes are contiguous rank ranges of nodeSize ranks.
struct Topo {
  int S, N, node, local;  // ranks per node, nodes, our node, our index in it
  __device__ __forceinline__ int nodeOf(int r) const { return r / S; }
  // The forwarder of source `src`'s tokens on node m (the rank of m with src's local index).
  __device__ __forceinline__ int forwarder(int src, int m) const { return m * S + src % S; }
  // The source on node n whose tokens we forward (our local index there).
  __device__ __forceinline__ int sourceOn(int n) const { return n * S + local; }
};

__device__ __forceinline__ Topo topo(const HTCommon& c) {
  return {c.nodeSize, c.nRanks / c.nodeSize, c.rank / c.nodeSize, c.rank % c.nodeSize};
}

// Block-wide: waits until every peer finished call seq - 1 (see the header). False (in every
// thread of the block) after a failed wait, here or anywhere.
template <class Net>
__device__ __forceinline__ bool waitPeersFree(const transport::Peers<Net>& peers, const HTCommon& c, uint32_t seq,
                                              int phase) {
  for (int d = threadIdx.x; d < c.nRanks; d += blockDim.x) {
    if (peers.viaNet(d)) {
      peers.wait(d, kHTSigDone, seq, c.timeoutNs, sink(c), phase);
    } else {
      waitPeerDone(c, peers.net.lsa, d, seq, phase);
    }
  }
  return __syncthreads_or(device::hasError(sink(c)) ? 1 : 0) == 0;  // the same answer in every thread
}

// Send role, block 0: stages our header (tokens of this call, epoch, reject code), puts it to each
// of our forwarders (header[our node] there), then covers it, and whatever the block put to them
// before, with kHTSigHeader (thread 0: the thread that issued the puts over GIN).
template <class Net>
__device__ __forceinline__ void sendHeader(const transport::Peers<Net>& peers, const HTCommon& c, const Topo& t,
                                           int numTokens, uint32_t epoch, int rejectCode) {
  const HTLayout& l = c.layout;
  if (threadIdx.x == 0) {
    int* h = reinterpret_cast<int*>(c.local + l.headerStage);
    h[0] = numTokens;
    h[1] = int(epoch);
    h[2] = rejectCode;
    h[3] = 0;
  }
  __syncthreads();
  for (int m = 0; m < t.N; ++m)
    if (m != t.node)
      peers.put(t.forwarder(c.rank, m), l.header + size_t(t.node) * 16, l.headerStage, 16, threadIdx.x, blockDim.x);
  __syncthreads();
  if (threadIdx.x == 0)
    for (int m = 0; m < t.N; ++m)
      if (m != t.node) peers.signal(t.forwarder(c.rank, m), kHTSigHeader, 1);
}

// Chunks of a stream (see the header): the chunk of token b, and how many chunks `tokens` fill.
__device__ __forceinline__ int chunkOf(const HTLayout& l, int b) { return b / l.chunkTokens; }
__device__ __forceinline__ int chunksOf(const HTLayout& l, int tokens) {
  return (tokens + l.chunkTokens - 1) / l.chunkTokens;
}

// A warp finished token b of a stream of `tokens` (row `row` of chunkArrivals): true in every lane
// of the warp whose arrival completes b's chunk. Its lane 0 then signals the chunk: after this
// arrival, which follows every put of the chunk (net.cuh's contract).
__device__ __forceinline__ bool arriveChunk(const HTCommon& c, int row, int b, int tokens, int lane) {
  const HTLayout& l = c.layout;
  __syncwarp();  // the warp's stores and puts for the token come before lane 0's arrival (a release)
  bool last = false;
  if (lane == 0) {
    const int chunk = chunkOf(l, b);
    const int size = min(l.chunkTokens, tokens - chunk * l.chunkTokens);
    uint32_t* arrivals = reinterpret_cast<uint32_t*>(c.local + l.chunkArrivals) + row * kHTMaxChunks + chunk;
    last = device::arriveLast(arrivals, uint32_t(size));
    if (last) *arrivals = 0;  // every token of the chunk arrived: nothing else touches it this call
  }
  return __shfl_sync(kFull, last, 0);
}

// Signals `peer` the chunks of a stream of `tokens` that hold none (they carry nothing; every
// chunk's signal still advances by one per call). Threads of a block.
template <class Net>
__device__ __forceinline__ void signalEmptyChunks(const transport::Peers<Net>& peers, const HTLayout& l, int peer,
                                                  int tokens) {
  for (int chunk = chunksOf(l, tokens) + threadIdx.x; chunk < l.chunks; chunk += blockDim.x)
    peers.signal(peer, kHTSigChunk + chunk, 1);
}

// One lane: waits for chunk `chunk` of `peer`'s stream to us in call seq (acquires its puts).
template <class Net>
__device__ __forceinline__ bool waitChunk(const transport::Peers<Net>& peers, const HTCommon& c, int peer, int chunk,
                                          uint32_t seq, int phase) {
  return peers.wait(peer, kHTSigChunk + chunk, uint64_t(seq) + 1, c.timeoutNs, sink(c), phase);
}

// Forward role: the tokens of the sources we forward for (one per other node, tokens[n] each),
// chunk by chunk (chunk c of every source before chunk c + 1: the order in which they land), dealt
// round robin to warp w of `warps`. Calls f(n, b) for each of the warp's tokens; stops when it
// returns false. Item i is token i % C of chunk i / (C * (N - 1)) of the ((i / C) % (N - 1))-th
// other node; items past a source's tokens are skipped.
template <class F>
__device__ __forceinline__ void forEachForwardedToken(const Topo& t, const HTLayout& l, const int* tokens, int w,
                                                      int warps, F&& f) {
  int most = 0;
  for (int n = 0; n < t.N; ++n)
    if (n != t.node) most = max(most, tokens[n]);
  const int C = l.chunkTokens, others = t.N - 1;
  const int items = chunksOf(l, most) * C * others;
  for (int i = w; i < items; i += warps) {
    const int k = (i / C) % others;
    const int n = k < t.node ? k : k + 1;
    const int b = i / (C * others) * C + i % C;
    if (b < tokens[n] && !f(n, b)) return;
  }
}

// Forward role, every block: waits for each source we forward for (one per other node) to have
// landed this call's header (in combine, with its info); tokens[n] = the source's tokens this call (0 for our
// node, or after a failure), rejects[n] (when given) its reject code (0: it did not reject).
template <class Net>
__device__ __forceinline__ void waitSources(const transport::Peers<Net>& peers, const HTCommon& c, const Topo& t,
                                            uint32_t seq, int* tokens, int* rejects = nullptr) {
  for (int n = threadIdx.x; n < t.N; n += blockDim.x) {
    int count = 0, code = 0;
    if (n != t.node && peers.wait(t.sourceOn(n), kHTSigHeader, uint64_t(seq) + 1, c.timeoutNs, sink(c), kPhaseHTForward)) {
      const int* h = reinterpret_cast<const int*>(c.local + c.layout.header + size_t(n) * 16);
      count = __ldcg(h);
      code = __ldcg(h + 2);
      if (uint32_t(__ldcg(h + 1)) != seq + 1 || count < 0 || count > c.layout.maxTokens) {
        device::reportError(sink(c), kDeviceProtocol, kPhaseHTForward, t.sourceOn(n), __ldcg(h + 1));
        count = 0;
        code = 0;
      }
    }
    tokens[n] = count;
    if (rejects != nullptr) rejects[n] = code;
  }
  __syncthreads();
}

// Ends an internode call: the last block of the grid advances the sequence (and the per-kind
// count), releases `done` for our node's peers and signals kHTSigDone to every other peer. Every
// block must call it.
template <class Net>
__device__ __forceinline__ void finishInternode(const transport::Peers<Net>& peers, const HTCommon& c, uint32_t seq,
                                                int kind, bool* lastShared) {
  __syncthreads();
  HTState* s = state(c);
  if (threadIdx.x == 0) {
    const bool last = device::arriveLast(&s->blocksDone[1], gridDim.x);
    if (last) {
      s->blocksDone[1] = 0;
      s->claimed = 0;
      s->seq = seq + 1;
      if (kind == kCallDispatch) s->dispatches += 1;
      device::storeRelease(&s->done, uint64_t(seq) + 1);
    }
    *lastShared = last;
  }
  __syncthreads();
  if (!*lastShared) return;
  for (int d = threadIdx.x; d < c.nRanks; d += blockDim.x)
    if (peers.viaNet(d)) peers.signal(d, kHTSigDone, 1);
}

// The network message of token b in our staging area, and where it lands at a forwarder.
__device__ __forceinline__ size_t netStageAt(const HTLayout& l, int b) {
  return l.netStage + size_t(b) * l.netMsgBytes;
}
__device__ __forceinline__ size_t netRecvAt(const HTLayout& l, int sourceNode, int b) {
  return l.netRecv + (size_t(sourceNode) * l.maxTokens + size_t(b)) * l.netMsgBytes;
}

// Offset of message (row `src`, slot j) of the slots region (the same in every window).
__device__ __forceinline__ size_t slotAt(const HTLayout& l, int src, int j) {
  return l.slots + (size_t(src) * l.maxTokens + size_t(j)) * l.msgBytes;
}

// Launches a hierarchical kernel over the group's network transport: GIN on real nodes, its LSA
// emulation under virtual nodes (kernel<NetGin> or kernel<NetEmulated>).
template <class Params>
inline int launchOnTransport(const Params& p, void (*gin)(Params), void (*emulated)(Params), int blocks,
                             cudaStream_t stream) {
  (p.c.useGin ? gin : emulated)<<<blocks, kHTThreads, 0, stream>>>(p);
  return int(cudaGetLastError());
}

}  // namespace ht
}  // namespace ncclep
