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
// same calls): kHTSigCounts +1 per dispatch (expected: HTState.dispatches + 1), kHTSigForward +1
// per call from a source to each of its forwarders (expected: seq + 1), kHTSigBack +1 per combine
// from a forwarder to each source it serves (HTState.combines + 1), kHTSigDone +1 per call.
//
// A rank that rejected the call (ncclep.h, "Rejected calls") keeps every signal and wait of the
// three roles (so the regions stay safe to reuse) but sends no token: zero tokens and its reason in
// its header (which a cached dispatch's forwarders turn into reject flags in the slots of its row at
// their node's ranks), its reject word as its dispatch counts' token total, and reject flags where
// its combine rows would go. Its forward role forwards the other sources' messages as usual: it
// knows no payload size or top-k of the call, so it moves the whole payload area and every choice.
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

// Block-wide arrival of the blocks of one role on blocksDone[counter]; true in every thread of
// the last block to arrive (which then sees what the others did before arriving).
__device__ __forceinline__ bool arriveRole(const HTCommon& c, int counter, int roleBlocks, bool* lastShared) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const bool last = device::arriveLast(&state(c)->blocksDone[counter], roleBlocks);
    if (last) state(c)->blocksDone[counter] = 0;
    *lastShared = last;
  }
  __syncthreads();
  return *lastShared;
}

// Send role, block 0: stages our header (tokens of this call, epoch, reject code) and puts it to
// each of our forwarders (header[our node] there). Covered by the kHTSigForward signal of
// `signalForwarders`.
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
}

// Send role, the last block to arrive: one kHTSigForward per call to each of our forwarders,
// after every send block's puts (the arrival orders them before).
template <class Net>
__device__ __forceinline__ void signalForwarders(const transport::Peers<Net>& peers, const HTCommon& c,
                                                 const Topo& t) {
  for (int m = threadIdx.x; m < t.N; m += blockDim.x)
    if (m != t.node) peers.signal(t.forwarder(c.rank, m), kHTSigForward, 1);
}

// Forward role, every block: waits for each source we forward for (one per other node) to have
// landed this call's header and messages; tokens[n] = the source's tokens this call (0 for our
// node, or after a failure), rejects[n] (when given) its reject code (0: it did not reject).
template <class Net>
__device__ __forceinline__ void waitSources(const transport::Peers<Net>& peers, const HTCommon& c, const Topo& t,
                                            uint32_t seq, int* tokens, int* rejects = nullptr) {
  for (int n = threadIdx.x; n < t.N; n += blockDim.x) {
    int count = 0, code = 0;
    if (n != t.node && peers.wait(t.sourceOn(n), kHTSigForward, uint64_t(seq) + 1, c.timeoutNs, sink(c), kPhaseHTForward)) {
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
    __threadfence();
    const bool last = device::arriveLast(&s->blocksDone[1], gridDim.x);
    if (last) {
      s->blocksDone[1] = 0;
      s->claimed = 0;
      s->seq = seq + 1;
      if (kind == kCallDispatch) s->dispatches += 1;
      if (kind == kCallCombine) s->combines += 1;
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
