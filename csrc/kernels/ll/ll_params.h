// Launch parameters of the LL kernels (host and device).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>
#include <nccl.h>
#include <nccl_device.h>

#include "common/device_error.h"
#include "kernels/limits.h"
#include "kernels/ll/ll_layout.h"

namespace ncclep {

constexpr int kLLThreads = 512;

enum LLPhase : int { kLLSend = 1, kLLRecv = 2 };

// Steps stamped per block when a trace buffer is given ([numBlocks][kLLTraceSteps] uint64 ns;
// steps a block does not reach stay as they were: the receive's, in a dispatch block that sent a
// token and left the receive to the others). First token = the block's first token.
enum LLTraceStep : int {
  kTraceSendStart = 0,
  kTraceAcked,      // after waiting for the destinations to free this parity (after the ranking)
  kTraceRouted,     // the block's first token ranked (its slots and rows known)
  kTraceSent,       // all the block's tokens stored
  kTraceArrived,    // after this block's data signals (each a release at system scope)
  kTraceRecvStart = 6,  // (5 unused: it was the send half's arrival count, which is gone)
  kTraceFlagsSeen,  // every source's counts acquired (its data is awaited per warp)
  kTraceCopied,     // the block's messages copied into the outputs
  kTraceLoaded,     // the last block: our tokens counted per expert and rank (others: after acked)
  kLLTraceSteps = 16,
};

struct LLCommon {
  ncclWindow_t window;
  char* local;  // our window's base address
  LLLayout layout;
  int rank;
  int nRanks;
  int numExperts;
  int nodeSize;       // ranks per (virtual) node: peers beyond it take the network path
  int lsaRankOffset;  // world rank of our LSA team's first rank
  int useGin;         // network path over GIN (else emulated over LSA)
  ncclDevComm devComm;  // for GIN
  uint64_t timeoutNs;
  DeviceError* error;  // device-mapped host memory
};

struct LLDispatchParams {
  LLCommon c;
  int phases;
  int rejectCode;  // 0, or this rank rejected the call (ncclepRejectReason_t): no token, no output
  // inputs
  const void* x;  // bf16 [numTokens, hidden]
  const void* topkIdx;
  int topkIdx64;
  const float* topkWeights;
  int numTokens;
  int hidden;
  int topk;
  int useFp8;
  int ue8m0;
  int pow2Scales;  // without ue8m0: fp32 scales rounded up to powers of two (ncclepLLDispatchArgs_t)
  unsigned long long* trace;  // optional [numBlocks][kLLTraceSteps] timestamps, nullptr = off
  // outputs
  void* recvX;         // [L, R*T, hidden] bf16 or fp8
  void* recvScales;    // [L, R*T, hidden/128] fp32 or ue8m0 bytes (fp8 only), dense unless scalesStrided
  int scalesStrided;   // scale word w of row i of local expert e at recvScales (int32 words) +
  long long scalesStrides[3];  // e*[0] + i*[1] + w*[2] (ncclepLLDispatchArgs_t.recvScalesStrides)
  int* expertCounts;   // [L]
  int* sendSlots;      // [numTokens, R]
  int* recvRows;       // [R, T, maxTopk]
  float* recvWeights;  // [R, T, maxTopk]
  int* recvSlotCounts; // [R]
};

struct LLCombineParams {
  LLCommon c;
  int phases;
  int rejectCode;  // 0, or this rank rejected the call (ncclepRejectReason_t): no row, no output
  const void* expertOut;  // bf16 [L, R*T, hidden]
  int hidden;
  int numTokens;
  const int* sendSlots;
  const int* recvRows;
  const float* recvWeights;
  const int* recvSlotCounts;
  void* out;  // bf16 [numTokens, hidden]
  const float* topkWeights;  // [numTokens, topk] on the token's rank, sent ahead
  int topk;                  // 0: no weights given, rows weighted by recvWeights
};

// Dynamic shared memory of the dispatch kernel for a group's layout.
size_t llDispatchSharedBytes(const LLLayout& l, int numExperts);

// Host launchers (ll_dispatch.cu, ll_combine.cu): return the cudaError_t of the launch.
int launchLLDispatch(const LLDispatchParams& p, int numBlocks, cudaStream_t stream);
int launchLLCombine(const LLCombineParams& p, int numBlocks, cudaStream_t stream);

}  // namespace ncclep
