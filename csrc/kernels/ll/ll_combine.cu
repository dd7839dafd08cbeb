// LL combine: the weighted sum over each token's experts, reduced in two steps.
//
// Send (on each expert rank): for every token received from source r in slot j, sum its local
// experts' rows times their weights in fp32 and put one bf16 row into slot j of r's combine area
// for us (a warp per part of a row; staged and put when r is across the network). Each block
// signals each rank the chunks it stored there.
//
// Weights given to the combine (p.topk > 0, also on a rank without tokens: p.topkWeights, on the
// token's rank) replace the dispatch's: first, block 0 of every rank stores its tokens' weights
// into the slots its tokens hold at each rank (combineWeights) and adds 1 to that rank's weights
// signal. It adds in every call, weights or not, so that after call seq every rank's signal stands
// at seq + 1; a call with weights waits for that value from each source it holds tokens of. The
// parity's entries at rank d are free again once d acknowledged call seq - 2, which the send half
// waits for anyway (for its rows): d acknowledges at the end of its receive half of seq - 2, after
// its send half of seq - 2 read them.
//
// Receive (on the token's rank): wait for every rank's signal, then out[b] = sum over ranks d of
// the row from d at slot send_slots[b, d], in rank order in fp32, written as bf16; then each rank's
// mark is set to its signal and the rank is acknowledged, so that it may reuse the parity: by each
// block for itself in a group with no network peer, else by the last block (ll_layout.h,
// kLLAckPerCall).
//
// A rank that rejected the call (p.rejectCode) sends no row: after the usual wait for the parity,
// it stores its `rejects` word ((epoch << 32) | reject word) at each rank, then adds kLLRejectAdd to
// that rank's data signal (the signal's release orders the word before it). A receiver whose wait
// ends with kLLRejectAdd or more above its mark reads the sender's `rejects` word: this call's
// epoch means the sender rejected this call (recorded; its rows count as none); an older one means
// rejections of earlier calls that this receiver, expecting nothing from the sender then, did not
// wait for: it steps its mark over them and waits again. The rejecting rank itself, without a
// handle, cannot tell what its peers send it: its receive half waits until each peer has
// acknowledged this call (its rows to us landed before: same signal path, issued earlier) or has
// rejected it too (its `rejects` word), then takes the signals as its marks.
#include "common/bf16.cuh"
#include "common/device_error.cuh"
#include "common/memory_order.cuh"
#include "common/reject.h"
#include "common/spin_wait.cuh"
#include "kernels/ll/ll_params.h"
#include "kernels/ll/ll_receive.cuh"
#include "transport/peers.cuh"

namespace ncclep {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

static_assert(3 * kLLMaxRanks <= kLLThreads, "three threads per rank in the receive's first step");

constexpr int kChoicesAtOnce = 8;  // send: experts' rows of one token loaded before they are summed
constexpr int kSourcesAtOnce = 8;  // receive: ranks' rows of one token loaded before they are summed
static_assert(kLLMaxTopk % kChoicesAtOnce == 0, "whole batches of choices");
constexpr int kMaxParts = 32;      // send: warps sharing one message's row

struct CombineShared {
  int start[kLLMaxRanks + 1];
  int chunksTo[kLLMaxRanks];  // send: 16-byte chunks this block stored for each rank
  int expected[kLLMaxRanks];  // receive: our tokens each rank returns (highest slot + 1)
  int rejected[kLLMaxRanks];  // receive: the rank rejected this call (its rows count as none)
  uint64_t mark[kLLMaxRanks];  // receive: our received-data mark of each rank in this parity
  uint64_t seen[kLLMaxRanks];  // receive: each rank's data signal (acquired), last read
  uint64_t sendSeq;            // the send half's call, ended by the receive half in a fused launch
  bool last;
};

// The slots our tokens hold at rank d are 0..n-1, so n = highest slot + 1 (one warp, every lane
// gets n). Rank d returns one row per slot, and holds one weights entry per slot.
__device__ __forceinline__ int slotsAt(const LLCombineParams& p, int d) {
  const int R = p.c.nRanks, lane = threadIdx.x & 31;
  int highest = -1;
  for (int b = lane; b < p.numTokens; b += 32) highest = max(highest, p.sendSlots[int64_t(b) * R + d]);
  return __reduce_max_sync(kFullMask, highest) + 1;
}

// The rows each rank returns: warps from `firstWarp` on, a rank each.
__device__ __forceinline__ void expectRows(const LLCombineParams& p, CombineShared& s, int firstWarp) {
  const int R = p.c.nRanks, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, numWarps = blockDim.x >> 5;
  for (int d = warp - firstWarp; warp >= firstWarp && d < R; d += numWarps - firstWarp) {
    const int n = slotsAt(p, d);
    if (lane == 0) s.expected[d] = n;
  }
}

// A rejecting rank's stand-in for its rows (block 0): its `rejects` word, then kLLRejectAdd, to
// each rank; the same thread puts (network) and signals, so the signal covers the word.
template <class Net>
__device__ void sendRejection(const LLCombineParams& p, const transport::Peers<Net>& peers, uint64_t seq) {
  const LLCommon& c = p.c;
  const LLLayout& l = c.layout;
  const uint32_t parity = uint32_t(seq) & 1u;
  const uint64_t word = (uint64_t(uint32_t(seq + 1)) << 32) | rejectWord(p.rejectCode);  // a 32-bit epoch
  for (int d = threadIdx.x; d < c.nRanks; d += blockDim.x) {
    const size_t at = l.rejectAt(l.rejects, parity, c.rank), stage = l.rejectAt(l.stageRejects, parity, d);
    *peers.template target<uint64_t>(d, at, stage) = word;
    peers.put(d, at, stage, 16, 0, 1);
    peers.signal(d, kSigCombineData + int(parity), kLLRejectAdd);
  }
}

// Block 0: our tokens' combine weights into their slots at each rank (if the call has them), then
// +1 on every rank's weights signal (every call, so that the signals count calls).
template <class Net>
__device__ void sendWeights(const LLCombineParams& p, const transport::Peers<Net>& peers, uint64_t seq) {
  const LLCommon& c = p.c;
  const LLLayout& l = c.layout;
  const uint32_t parity = uint32_t(seq) & 1u;
  const int R = c.nRanks, KM = l.maxTopk, K = p.topk;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, numWarps = blockDim.x >> 5;
  const bool weights = p.topk > 0 && p.rejectCode == 0;
  if (weights) {
    for (int i = tid; i < p.numTokens * R; i += blockDim.x) {
      const int b = i / R, d = i % R;
      const int slot = p.sendSlots[i];
      if (slot < 0) continue;
      float* entry = peers.template target<float>(d, l.weightsAt(l.combineWeights, parity, c.rank, slot),
                                                   l.weightsAt(l.stageCombineWeights, parity, d, slot));
      float weight[kLLMaxTopk];  // all loaded before any is stored: one round trip, not one per four
#pragma unroll
      for (int k = 0; k < kLLMaxTopk; ++k) weight[k] = k < K ? p.topkWeights[int64_t(b) * K + k] : 0.0f;
#pragma unroll
      for (int k = 0; k < kLLMaxTopk; ++k)
        if (k < KM) entry[k] = weight[k];
    }
    __syncthreads();
    for (int d = warp; d < R; d += numWarps) {  // the network peers' entries, every slot we hold
      if (!peers.viaNet(d)) continue;
      const int slots = slotsAt(p, d);
      if (slots > 0)
        peers.put(d, l.weightsAt(l.combineWeights, parity, c.rank, 0), l.weightsAt(l.stageCombineWeights, parity, d, 0),
                  size_t(slots) * l.weightsBytes, lane, 32);
    }
    __syncthreads();
  }
  for (int d = tid; d < R; d += blockDim.x) peers.signal(d, kSigCombineWeights, 1);
}

// Waits for source r's rows of this call (`need` chunks past our mark, mark[r]), starting from the
// signal's value seen[r] acquired before; sets rejected[r] when r rejected the call instead, and
// leaves in seen[r] the value that ended the wait. False after a failed wait.
template <class Net>
__device__ bool waitRows(const LLCombineParams& p, const transport::Peers<Net>& peers, const device::ErrorSink& err,
                         uint64_t seq, int r, uint64_t need, CombineShared& s) {
  const LLCommon& c = p.c;
  const uint32_t parity = uint32_t(seq) & 1u;
  const int kind = kSigCombineData + int(parity);
  uint64_t base = s.mark[r], seen = s.seen[r];
  for (;;) {
    if (seen < base + need && !peers.wait(r, kind, base + need, c.timeoutNs, err, kPhaseLLCombineRecv, &seen))
      return false;
    s.seen[r] = seen;
    const uint64_t adds = (seen - base) >> kLLRejectShift;
    if (adds == 0) return true;
    const uint64_t word =
        device::loadAcquire(reinterpret_cast<const uint64_t*>(c.local + c.layout.rejectAt(c.layout.rejects, parity, r)));
    if (uint32_t(word >> 32) == uint32_t(seq + 1)) {
      s.rejected[r] = 1;
      if (blockIdx.x == 0) device::reportError(err, kDevicePeerRejected, kPhaseLLCombineRecv, r, rejectReason(uint32_t(word)));
      return true;
    }
    base += adds << kLLRejectShift;  // earlier calls' rejections: wait for this call's rows past them
  }
}

// The rejecting rank's wait for rank r: r acknowledged this call, or rejected it too.
template <class Net>
__device__ bool waitPeerDoneWithCall(const LLCombineParams& p, const transport::Peers<Net>& peers,
                                     const device::ErrorSink& err, uint64_t seq, int r) {
  const LLCommon& c = p.c;
  const uint64_t* word =
      reinterpret_cast<const uint64_t*>(c.local + c.layout.rejectAt(c.layout.rejects, uint32_t(seq) & 1u, r));
  return device::waitUntil<device::SignalBackoff>(
      [&] {
        return peers.read(r, kSigCombineAck) >= (uint64_t(seq) + 1) * ll::ackPerCall<Net>() ||
               uint32_t(device::loadAcquire(word) >> 32) == uint32_t(seq + 1);
      },
      c.timeoutNs, err, kPhaseLLCombineRecv, r, int32_t(seq + 1));
}


// `ends`: a send-only launch, where this half ends the block's call; in a launch with the receive
// half, that half ends both, and the rows each rank returns are worked out here, while the first
// loads are in flight.
template <class Net>
__device__ void combineSend(const LLCombineParams& p, CombineShared& s, bool ends) {
  const LLCommon& c = p.c;
  const LLLayout& l = c.layout;
  const transport::Peers<Net> peers = transport::makePeers<Net>(c, {l.signals, l.nRanks});
  LLState* state = reinterpret_cast<LLState*>(c.local + l.state);
  const device::ErrorSink err{c.error, &state->aborted};
  const uint64_t seq = ll::blockCalls(c, kHalfCombineSend);
  const uint32_t parity = uint32_t(seq) & 1u;
  const int R = c.nRanks, T = l.maxTokens, KM = l.maxTopk;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, numWarps = blockDim.x >> 5;

  // Parity `parity` of a rank still holds our rows of call seq-2 until it acknowledged them: the
  // acknowledgement is read beside the sequence number (warp 0) and waited for below if needed.
  const uint64_t ackSeen = tid < R ? peers.read(tid, kSigCombineAck) : 0;
  if (warp == 1) {  // the prefix of the tokens each source sent us: where its items start
    const int total = ll::warpPrefix(
        R, [&](int r) { return p.rejectCode == 0 ? p.recvSlotCounts[r] : 0; },
        [&](int r, int, int start) { s.start[r] = start; });
    if (lane == 0) s.start[R] = total;
  }
  if (!ends) expectRows(p, s, 2);
  if (tid < R) s.chunksTo[tid] = 0;
  bool acked = true;
  const uint64_t ackedCalls = uint64_t(seq - 1) * ll::ackPerCall<Net>();
  if (tid < R && seq >= 2 && ackSeen < ackedCalls)
    acked = peers.wait(tid, kSigCombineAck, ackedCalls, c.timeoutNs, err, kPhaseLLCombineSend);
  // The barrier also orders each acknowledgement before every thread's stores to that rank.
  bool failed = __syncthreads_or(!acked);
  if (blockIdx.x == 0 && !failed) {
    if (p.rejectCode != 0) sendRejection(p, peers, seq);
    sendWeights(p, peers, seq);
  }
  const bool givenWeights = p.topk > 0 && p.rejectCode == 0;
  if (givenWeights && !failed) {  // the sources' weights of this call, from those we hold tokens of
    bool ok = true;
    if (tid < R && p.recvSlotCounts[tid] > 0)
      ok = peers.wait(tid, kSigCombineWeights, uint64_t(seq) + 1, c.timeoutNs, err, kPhaseLLCombineSend);
    failed = __syncthreads_or(!ok);
  }
  const float* givenWeightsAt = reinterpret_cast<const float*>(c.local + l.weightsAt(l.combineWeights, parity, 0, 0));

  // Work items: (message, part), a warp each, spread over the SMs first.
  const int total = failed ? 0 : s.start[R];
  const int chunks = p.hidden / 8;
  const int warps = int(gridDim.x) * numWarps;
  // Up to kMaxParts warps per message where warps are plentiful (few tokens): a lane's chunks are
  // summed one at a time (below), so fewer chunks per lane is a shorter chain. A part is also a
  // put across the network: there parts stay an eighth of a row or more.
  const int maxParts = Net::kCrossesNodes ? 8 : kMaxParts;
  int parts = total > 0 ? warps / total : 1;
  parts = parts < 1 ? 1 : (parts > maxParts ? maxParts : parts);
  const int perPart = (chunks + parts - 1) / parts;
  const int4* rows = static_cast<const int4*>(p.expertOut);
  // Block 0 takes the last items: it first sent the weights' signal (a release each).
  const int order = (int(blockIdx.x) + int(gridDim.x) - 1) % int(gridDim.x);
  for (int item = warp * gridDim.x + order; item < total * parts; item += warps) {
    const int m = item / parts, part = item % parts;
    const int r = ll::sourceOf(s.start, R, m);
    const int j = m - s.start[r];
    const int64_t at = (int64_t(r) * T + j) * KM;
    const int myRow = lane < KM ? p.recvRows[at + lane] : -1;
    float myWeight = 0.0f;
    if (lane < KM)  // given weights were written by the source (acquired above): read through L2
      myWeight = givenWeights ? __ldcg(givenWeightsAt + (int64_t(r) * T + j) * (l.weightsBytes / 4) + lane)
                              : p.recvWeights[at + lane];
    int rowK[kLLMaxTopk];
    float weightK[kLLMaxTopk];
#pragma unroll
    for (int k = 0; k < kLLMaxTopk; ++k) {
      rowK[k] = __shfl_sync(kFullMask, myRow, k);
      weightK[k] = __shfl_sync(kFullMask, myWeight, k);
    }
    const size_t dstOffset = l.combineSlots + ((size_t(parity) * R + c.rank) * T + size_t(j)) * l.combineMsgBytes;
    const size_t stageOffset = l.stageCombine + ((size_t(parity) * R + r) * T + size_t(j)) * l.combineMsgBytes;
    int4* dst = peers.template target<int4>(r, dstOffset, stageOffset);
    const int begin = part * perPart, end = begin + perPart < chunks ? begin + perPart : chunks;
    // A lane's chunk of kChoicesAtOnce choices' rows is loaded before any of them is summed: one
    // memory round trip per batch of choices, not one per choice (summing each as it arrived made
    // a chain of round trips as long as the token's choices on this rank). The sum stays in
    // choice order, the reference's.
    for (int i = begin + lane; i < end; i += 32) {
      float acc[8] = {};
#pragma unroll
      for (int k0 = 0; k0 < kLLMaxTopk; k0 += kChoicesAtOnce) {
        if (k0 >= KM) break;
        int4 v[kChoicesAtOnce];
#pragma unroll
        for (int u = 0; u < kChoicesAtOnce; ++u)
          if (k0 + u < KM && rowK[k0 + u] >= 0) v[u] = rows[int64_t(rowK[k0 + u]) * chunks + i];
#pragma unroll
        for (int u = 0; u < kChoicesAtOnce; ++u)
          if (k0 + u < KM && rowK[k0 + u] >= 0) device::fmaBf16x8(acc, v[u], weightK[k0 + u]);
      }
      dst[i] = device::packBf16x8(acc);
    }
    if (lane == 0 && end > begin) atomicAdd(&s.chunksTo[r], end - begin);
    if (peers.viaNet(r) && begin < end) {
      __syncwarp();
      peers.put(r, dstOffset + size_t(begin) * 16, stageOffset + size_t(begin) * 16, size_t(end - begin) * 16,
                 lane, 32);
    }
  }

  // Each block tells each rank how many chunks of its rows landed (the signal's release publishes them).
  __syncthreads();
  if (tid < R && s.chunksTo[tid] > 0) peers.signal(tid, kSigCombineData + int(parity), s.chunksTo[tid]);
  if (tid == 0) s.sendSeq = seq;
  if (ends && tid == 0) ll::endBlockCall(c, kHalfCombineSend, seq);
}

// `endsSend`: a fused launch, whose send half's call (s.sendSeq) this half's arrival ends too, and
// whose send half worked out the rows each rank returns.
template <class Net>
__device__ void combineRecv(const LLCombineParams& p, CombineShared& s, bool endsSend) {
  const LLCommon& c = p.c;
  const LLLayout& l = c.layout;
  const transport::Peers<Net> peers = transport::makePeers<Net>(c, {l.signals, l.nRanks});
  LLState* state = reinterpret_cast<LLState*>(c.local + l.state);
  const device::ErrorSink err{c.error, &state->aborted};
  const uint64_t seq = ll::blockCalls(c, kHalfCombineRecv);
  const uint32_t parity = uint32_t(seq) & 1u;
  const int R = c.nRanks, T = l.maxTokens;
  const int tid = threadIdx.x;
  const int chunks = p.hidden / 8;

  // First step, in one round trip: thread r loads our marks of rank r (every slot, before the
  // sequence number is known), threads R + 2r + q read (acquire) its data signal of parity q.
  if (tid < R) {
    uint64_t marks[kLLMarkSlots];
#pragma unroll
    for (uint32_t slot = 0; slot < kLLMarkSlots; ++slot) marks[slot] = *ll::receivedMark(c, 1, slot, tid);
    const uint32_t slot = uint32_t(seq % kLLMarkSlots);
    static_assert(kLLMarkSlots == 4, "the selection below");
    s.mark[tid] = slot == 0 ? marks[0] : slot == 1 ? marks[1] : slot == 2 ? marks[2] : marks[3];
    s.rejected[tid] = 0;
  } else if (tid < 3 * R) {
    ll::readDataSignal(peers, kSigCombineData, R, parity, tid, s.seen);
  }
  if (!endsSend) expectRows(p, s, (3 * R + 31) / 32);
  __syncthreads();
  bool ok = true;
  if (tid < R) {
    if (p.rejectCode != 0) ok = waitPeerDoneWithCall(p, peers, err, seq, tid);
    else ok = waitRows(p, peers, err, seq, tid, uint64_t(s.expected[tid]) * uint64_t(chunks), s);
  }
  if (__syncthreads_or(!ok)) return;

  const char* slots = c.local + l.combineSlots + size_t(parity) * R * T * l.combineMsgBytes;
  for (int b = blockIdx.x; b < p.numTokens; b += gridDim.x) {
    const int* sendSlots = p.sendSlots + int64_t(b) * R;
    for (int i = tid; i < chunks; i += blockDim.x) {
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      // The chunks of kSourcesAtOnce ranks loaded before any is summed (one round trip per batch,
      // not per rank); summed in rank order.
      for (int d0 = 0; d0 < R; d0 += kSourcesAtOnce) {
        int4 v[kSourcesAtOnce];
        bool have[kSourcesAtOnce];
#pragma unroll
        for (int u = 0; u < kSourcesAtOnce; ++u) {
          const int d = d0 + u;
          const int slot = d < R ? sendSlots[d] : -1;
          have[u] = slot >= 0 && !s.rejected[d];
          if (have[u])
            v[u] = device::loadCg(reinterpret_cast<const int4*>(slots + (size_t(d) * T + slot) * l.combineMsgBytes) + i);
        }
#pragma unroll
        for (int u = 0; u < kSourcesAtOnce; ++u)
          if (have[u]) device::fmaBf16x8(acc, v[u], 1.0f);
      }
      static_cast<int4*>(p.out)[int64_t(b) * chunks + i] = device::packBf16x8(acc);
    }
  }

  __syncthreads();
  if (tid == 0) {
    ll::endBlockCall(c, kHalfCombineRecv, seq);
    if (endsSend) ll::endBlockCall(c, kHalfCombineSend, s.sendSeq);
  }
  // Everything r added to the signal in this parity is ours to count: its rows of this call (or
  // its rejection), and rejections of earlier calls; its next call here waits for our ack. The
  // value that ended a block's wait has it all (r adds nothing more here before that ack); a
  // rejecting rank, which waited for acknowledgements instead, reads the signal now. One block
  // stores the marks: block 0 where each block acknowledges for itself (this parity's next call,
  // a later kernel, reads them), else the last to arrive.
  // This block has read its rows (the barrier above followed its last loads of them). A
  // rejecting rank reads its data signal once our acknowledgement reaches it
  // (waitPeerDoneWithCall): where this launch's send half added rows to that signal, the
  // acknowledgement is a release, so that the add is seen first.
  ll::acknowledgeSources(
      c, peers, kHalfCombineRecv, kSigCombineAck, s.last, blockIdx.x == 0,
      [&](int r) {
        *ll::receivedMark(c, 1, seq + 2, r) =
            p.rejectCode != 0 ? peers.read(r, kSigCombineData + int(parity)) : s.seen[r];
      },
      [&](int r) { return endsSend && s.chunksTo[r] > 0; });
}

template <class Net>
__global__ void __launch_bounds__(kLLThreads, 1) llCombineKernel(const __grid_constant__ LLCombineParams p) {
  __shared__ CombineShared shared;
  const bool fused = (p.phases & kLLSend) && (p.phases & kLLRecv);
  if (p.phases & kLLSend) {
    combineSend<Net>(p, shared, !fused);
    __syncthreads();
  }
  if (p.phases & kLLRecv) combineRecv<Net>(p, shared, fused);
}

}  // namespace

int launchLLCombine(const LLCombineParams& p, int numBlocks, cudaStream_t stream) {
  if (p.c.useGin) llCombineKernel<transport::NetGin><<<numBlocks, kLLThreads, 0, stream>>>(p);
  else if (p.c.nodeSize >= p.c.nRanks) llCombineKernel<transport::NetNone><<<numBlocks, kLLThreads, 0, stream>>>(p);
  else llCombineKernel<transport::NetEmulated><<<numBlocks, kLLThreads, 0, stream>>>(p);
  return int(cudaGetLastError());
}

}  // namespace ncclep
