// Where the LL protocol keeps its data in the symmetric window (same offsets on every rank), and
// the format of one dispatched token. Host code plans it; kernels read it.
//
// Window (offsets from the window base, each region 256-byte aligned):
//   state            LLState: sequence numbers and block counters, local use, plus the
//                    acknowledgements peers read before reusing our buffers
//   dispatchFlags    uint64 [2 parities][R sources]: (epoch << 32) | tokens sent
//   dispatchCounts   int32  [2][R sources][L local experts]: tokens each source sent per expert
//   combineFlags     uint64 [2][R sources]: epoch << 32
//   dispatchSlots    [2][R sources][T slots][dispatchMsgBytes]
//   combineSlots     [2][R sources][T slots][hidden * 2]
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

#if defined(__CUDACC__)
#define NCCLEP_HOST_DEVICE __host__ __device__
#else
#define NCCLEP_HOST_DEVICE
#endif

namespace ncclep {

struct LLState {
  uint32_t dispatchSendSeq;
  uint32_t dispatchRecvSeq;
  uint32_t combineSendSeq;
  uint32_t combineRecvSeq;
  uint32_t blocksDone[4];     // one arrival counter per phase
  uint64_t dispatchRecvDone;  // receives completed; a sender reuses parity p only after ours caught up
  uint64_t combineRecvDone;
  uint32_t aborted;           // set with the error word: waiters poll this (device memory), not the
                              // host-mapped word, whose PCIe reads would slow every spin
};

struct LLLayout {
  size_t state;
  size_t dispatchFlags;
  size_t dispatchCounts;
  size_t combineFlags;
  size_t dispatchSlots;
  size_t combineSlots;
  size_t end;
  uint32_t headerBytes;
  uint32_t dispatchMsgBytes;
  uint32_t combineMsgBytes;
  int nRanks;
  int maxTokens;
  int numLocalExperts;
  int maxTopk;
  int hidden;
};

NCCLEP_HOST_DEVICE inline size_t llAlignUp(size_t x, size_t to) { return (x + to - 1) / to * to; }

NCCLEP_HOST_DEVICE inline uint32_t llHeaderBytes(int maxTopk) {
  return uint32_t(llAlignUp(4 + size_t(maxTopk) * 12, 16));
}

// Largest payload: fp8 plus fp32 scales is smaller than bf16 for any hidden >= 128, so bf16 sizes it.
NCCLEP_HOST_DEVICE inline uint32_t llPayloadBytes(int hidden, bool fp8) {
  size_t bytes = fp8 ? size_t(hidden) + size_t(hidden / 128) * 4 : size_t(hidden) * 2;
  return uint32_t(llAlignUp(bytes, 16));
}

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
  l.dispatchMsgBytes = l.headerBytes + llPayloadBytes(hidden, false);
  l.combineMsgBytes = uint32_t(llAlignUp(size_t(hidden) * 2, 16));
  const size_t slots = 2 * size_t(nRanks) * size_t(maxTokens);
  size_t at = llAlignUp(base, 256);
  l.state = at;
  at = llAlignUp(at + sizeof(LLState), 256);
  l.dispatchFlags = at;
  at = llAlignUp(at + 2 * size_t(nRanks) * 8, 256);
  l.dispatchCounts = at;
  at = llAlignUp(at + 2 * size_t(nRanks) * size_t(numLocalExperts) * 4, 256);
  l.combineFlags = at;
  at = llAlignUp(at + 2 * size_t(nRanks) * 8, 256);
  l.dispatchSlots = at;
  if (slots > (SIZE_MAX - at) / l.dispatchMsgBytes) return false;
  at = llAlignUp(at + slots * l.dispatchMsgBytes, 256);
  l.combineSlots = at;
  if (slots > (SIZE_MAX - at) / l.combineMsgBytes) return false;
  l.end = llAlignUp(at + slots * l.combineMsgBytes, 256);
  *out = l;
  return true;
}

}  // namespace ncclep
