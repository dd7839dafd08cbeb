// Where the LL protocol keeps its data in the symmetric window (same offsets on every rank), and
// the format of one dispatched token. Host code plans it; kernels read it.
//
// Window (offsets from the window base, each region 256-byte aligned):
//   state            LLState: each block's call numbers, block counters (local use only)
//   signals          uint64 [kLLSignalKinds][R peers]: monotonic counters that peers add to
//                    (LSA and the emulated network; GIN keeps its own signals, same indices)
//   received         uint64 [2 ops][kLLMarkSlots][R peers]: what the data signals held after our
//                    receive of the call two before (local use), so a call waits for old + this
//                    call's (ll_receive.cuh: receivedMark)
//   dispatchCounts   int32 [2 parities][R sources][L + 1]: tokens the source sent per local
//                    expert, then the tokens it sent us
//   dispatchSlots    [2][R sources][T slots][dispatchMsgBytes]
//   combineSlots     [2][R sources][T slots][combineMsgBytes]
//   rejects          [2][R sources][16 bytes]: uint64 (epoch << 32) | reject word (reject.h) of the
//                    source's last rejected combine in that parity (see kLLRejectAdd)
//   combineWeights   float [2][R sources][T slots][maxTopk, padded to 16 bytes]: a combine given
//                    weights on the token's rank: the source's token's weight per top-k choice
//   stage*           the same five regions indexed by destination instead of source: a message
//                    for a peer reached over the network is written here first, then put
//
// A dispatched token (one message per destination rank):
//   header  int32 token index, then per top-k choice k < maxTopk: int32 local expert id (-1 if the
//           expert is not on the destination), int32 its row among this source's tokens for that
//           expert, float weight; padded to 16 bytes
//   payload bf16 [hidden], or fp8 e4m3 [hidden] then the scales (fp32 or UE8M0 bytes) [hidden/128],
//           padded to 16 bytes
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/limits.h"

namespace ncclep {

// What a rank that rejected a combine adds to each peer's combine data signal instead of rows
// (after storing its `rejects` word there): more than any call's chunks (R * T * hidden / 8 stays
// far below 2^40), so a receiver tells it from data by the difference to its mark.
constexpr int kLLRejectShift = 40;
constexpr uint64_t kLLRejectAdd = uint64_t(1) << kLLRejectShift;

// Signal kinds: signal (kind, peer) is a counter in our window that `peer` adds to.
enum LLSignalKind : int {
  kSigDispatchCounts = 0,  // +1 per call: peer's counts for us (this call's parity) are in place
  kSigDispatchData = 1,    // 2 parities: +n per n of peer's messages that landed in that parity
  kSigDispatchAck = 3,     // per call (see kLLAckPerCall): peer has read our messages, we may reuse the parity
  kSigCombineData = 4,     // 2 parities: +n per n 16-byte chunks of combined rows that landed
  kSigCombineAck = 6,
  kSigCombineWeights = 7,  // +1 per combine: peer's weights for its tokens here (if the call has
                           // them) are in place in parity (combine call & 1)
  kLLSignalKinds = 8,
};

// What a call adds to each source's acknowledgement signal (kSigDispatchAck, kSigCombineAck). In a
// group with no network peer each block acknowledges its sources as it finishes (no block waits
// for the others' arrival; a dispatch block that takes no part in the receive, at once, having read
// nothing: ll_dispatch.cu, receivesIn): block 0 adds kLLAckPerCall - (blocks - 1), every other
// block 1, so a call adds kLLAckPerCall whatever the rank's grid, and only once every block that
// reads has added its share. Across the network the last block to arrive
// adds 1 (one network signal per call, not one per block). ll_receive.cuh: ackPerCall.
constexpr uint64_t kLLAckPerCall = uint64_t(1) << 16;  // > kLLMaxBlocks
static_assert(kLLAckPerCall > uint64_t(kLLMaxBlocks), "block 0's share stays positive");

// Received-data marks kept per op and peer: call n reads slot n % 4, which call n - 2 (the same
// parity) wrote at its end, and writes slot (n + 2) % 4. Four, not two, so that a block that ends
// call n early never overwrites the mark a slower block of call n has still to read (each block
// reads the marks as it starts its receive; one block writes them when it is done).
constexpr uint32_t kLLMarkSlots = 4;

enum LLHalf : int { kHalfDispatchSend = 0, kHalfDispatchRecv, kHalfCombineSend, kHalfCombineRecv };

struct LLState {
  // [LLHalf][block]: the calls of that half this block finished. 64-bit, as the signal counters
  // they are compared with: 32 bits wrap after 2^32 calls (days of decode), and then every wait
  // for a peer's counts or acknowledgement would pass at once.
  uint64_t calls[4][kLLMaxBlocks];
  uint32_t blocksDone[4];  // one arrival counter per half (a fused launch counts in its receive's)
  uint32_t aborted;        // set with the error word: waiters poll this (device memory), not the
                           // host-mapped word, whose PCIe reads would slow every spin
};

struct LLLayout {
  size_t state;
  size_t signals;
  size_t received;
  size_t dispatchCounts;
  size_t dispatchSlots;
  size_t combineSlots;
  size_t rejects;
  size_t combineWeights;
  size_t stageCounts;
  size_t stageDispatch;
  size_t stageCombine;
  size_t stageRejects;
  size_t stageCombineWeights;
  size_t end;
  uint32_t headerBytes;
  uint32_t dispatchMsgBytes;
  uint32_t combineMsgBytes;
  uint32_t countsBytes;  // one (parity, peer) entry of the counts regions
  uint32_t weightsBytes;  // one slot's entry of the combine weights regions
  int nRanks;
  int maxTokens;
  int numLocalExperts;
  int maxTopk;
  int hidden;

#if defined(__CUDACC__)
  __host__ __device__
#endif
  size_t receivedAt(int op, uint64_t call, int peer) const {  // op: 0 dispatch, 1 combine
    return received + ((size_t(op) * kLLMarkSlots + call % kLLMarkSlots) * size_t(nRanks) + size_t(peer)) * 8;
  }

#if defined(__CUDACC__)
  __host__ __device__
#endif
  size_t rejectAt(size_t region, uint32_t parity, int peer) const {  // region: rejects or stageRejects
    return region + (size_t(parity) * size_t(nRanks) + size_t(peer)) * 16;
  }

#if defined(__CUDACC__)
  __host__ __device__
#endif
  size_t weightsAt(size_t region, uint32_t parity, int peer, int slot) const {  // combineWeights or its stage
    return region + ((size_t(parity) * size_t(nRanks) + size_t(peer)) * size_t(maxTokens) + size_t(slot)) * weightsBytes;
  }
};

inline size_t llAlignUp(size_t x, size_t to) { return (x + to - 1) / to * to; }

inline uint32_t llHeaderBytes(int maxTopk) { return uint32_t(llAlignUp(4 + size_t(maxTopk) * 12, 16)); }

// Largest payload: fp8 plus fp32 scales is smaller than bf16 for any hidden >= 128, so bf16 sizes it.
inline uint32_t llPayloadBytes(int hidden) { return uint32_t(llAlignUp(size_t(hidden) * 2, 16)); }

// Plans the regions starting at `base`; returns false on overflow.
inline bool planLLLayout(size_t base, int nRanks, int maxTokens, int numLocalExperts, int maxTopk, int hidden,
                         LLLayout* out) {
  LLLayout l{};
  l.nRanks = nRanks;
  l.maxTokens = maxTokens;
  l.numLocalExperts = numLocalExperts;
  l.maxTopk = maxTopk;
  l.hidden = hidden;
  l.headerBytes = llHeaderBytes(maxTopk);
  l.dispatchMsgBytes = l.headerBytes + llPayloadBytes(hidden);
  l.combineMsgBytes = llPayloadBytes(hidden);
  l.countsBytes = uint32_t(llAlignUp((size_t(numLocalExperts) + 1) * 4, 16));
  l.weightsBytes = uint32_t(llAlignUp(size_t(maxTopk) * 4, 16));  // whole 16-byte words: a put moves those
  const size_t perParity = 2 * size_t(nRanks);
  const size_t slots = perParity * size_t(maxTokens);
  if (slots / perParity != size_t(maxTokens)) return false;
  size_t at = llAlignUp(base, 256);
  auto take = [&](size_t* region, size_t count, size_t bytes) {
    *region = at;
    if (bytes && count > (SIZE_MAX / 2 - at) / bytes) return false;
    at = llAlignUp(at + count * bytes, 256);
    return true;
  };
  const bool ok = take(&l.state, 1, sizeof(LLState)) && take(&l.signals, size_t(kLLSignalKinds) * nRanks, 8) &&
                  take(&l.received, 2 * kLLMarkSlots * size_t(nRanks), 8) &&
                  take(&l.dispatchCounts, perParity, l.countsBytes) &&
                  take(&l.dispatchSlots, slots, l.dispatchMsgBytes) &&
                  take(&l.combineSlots, slots, l.combineMsgBytes) && take(&l.rejects, perParity, 16) &&
                  take(&l.combineWeights, slots, l.weightsBytes) && take(&l.stageCounts, perParity, l.countsBytes) &&
                  take(&l.stageDispatch, slots, l.dispatchMsgBytes) &&
                  take(&l.stageCombine, slots, l.combineMsgBytes) && take(&l.stageRejects, perParity, 16) &&
                  take(&l.stageCombineWeights, slots, l.weightsBytes);
  if (!ok) return false;
  l.end = at;
  *out = l;
  return true;
}

}  // namespace ncclep
