// Launch parameters of the HT kernels (host and device).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>
#include <nccl.h>
#include <nccl_device.h>

#include "common/device_error.h"
#include "kernels/ht/ht_layout.h"
#include "kernels/limits.h"

namespace ncclep {

constexpr int kHTThreads = 512;    // 16 warps per block
constexpr int kHTWarps = kHTThreads / 32;

struct HTCommon {
  ncclWindow_t window;
  char* local;  // our window's base address
  HTLayout layout;
  int rank;
  int nRanks;
  int numExperts;
  uint64_t timeoutNs;
  DeviceError* error;  // device-mapped host memory
  int sendBlocks;      // blocks [0, sendBlocks) send, the others receive
  // Hierarchical path (nodeSize < nRanks): blocks [sendBlocks, sendBlocks + forwardBlocks)
  // forward, the rest receive. Unused by the intranode kernels.
  int hier;             // 1: the count kernel leaves its totals for the internode kernels
  int forwardBlocks;
  int nodeSize;         // ranks per (virtual) node; nodes are contiguous rank ranges
  int lsaRankOffset;    // world rank of our LSA team's first rank
  int useGin;           // network hop over GIN (else emulated over LSA)
  ncclDevComm devComm;  // for GIN
};

// rejectCode (all three ops): 0, or this rank rejected the call (ncclepRejectReason_t): it moves no
// payload, tells its peers in the words they wait on, and writes no output.
struct HTDispatchParams {
  HTCommon c;
  int rejectCode;
  // inputs
  const void* x;        // [numTokens, rowBytes] bf16 or fp8 bytes
  const void* xScales;  // fp8 only: [numTokens, scaleRowBytes]
  int rowBytes;         // bytes of one x row (a multiple of 16)
  int scaleRowBytes;    // 0 for bf16
  int scaleWordBytes;   // 4 (fp32 scales) or 1 (UE8M0)
  const void* topkIdx;  // [numTokens, topk] int32 or int64
  int topkIdx64;
  const float* topkWeights;  // [numTokens, topk] or nullptr
  int numTokens;
  int topk;
  int expertMajor;
  int alignment;
  int numRows;
  // outputs
  void* recvX;             // [numRows, rowBytes]
  void* recvScales;        // [numRows, scaleRowBytes]
  void* recvTopkIdx;       // [numRows, topk] int32 or int64
  int recvTopkIdx64;
  float* recvTopkWeights;  // [numRows, topk] or nullptr
  int* numRecv;            // [1]
  int* expertCounts;       // [L]
  int* sendPos;            // [numTokens, R]
  int* recvSlot;           // [numRows]
  int* recvCounts;         // [R]
};

struct HTCombineParams {
  HTCommon c;
  int rejectCode;
  const void* x;             // bf16 [numRows, hidden]
  int hidden;
  const float* topkWeights;  // [numRows, topk] or nullptr
  int topk;
  const int* sendPos;        // the dispatch's handle
  const int* recvSlot;
  const int* recvCounts;
  const void* recvTopkIdx;   // [numRows, topk] int32 or int64
  int recvTopkIdx64;
  int numTokens;
  int numRows;
  void* out;                 // bf16 [numTokens, hidden]
  float* outWeights;         // [numTokens, topk] or nullptr
};

struct HTCachedParams {
  HTCommon c;
  int rejectCode;
  const void* x;  // [numTokens, rowBytes]
  int rowBytes;
  int numTokens;
  int numRows;
  const int* sendPos;
  const int* recvSlot;
  void* out;  // [numRows, rowBytes]
};

// Host launchers: each returns the cudaError_t of its launches.
int launchHTLayout(const HTDispatchParams& p, int numSms, cudaStream_t stream);      // ht_layout.cu
int launchHTDispatch(const HTDispatchParams& p, int numBlocks, cudaStream_t stream);  // ht_dispatch.cu
int launchHTCombine(const HTCombineParams& p, int numBlocks, cudaStream_t stream);    // ht_combine.cu
// Both combines' first step (ht_combine.cu): rowsOf[slot], the rows holding each slot, from recv_slot.
int launchHTCombinePrepare(const HTCombineParams& p, int numBlocks, cudaStream_t stream);
int launchHTCached(const HTCachedParams& p, int numBlocks, cudaStream_t stream);      // ht_cached.cu
// Hierarchical path (several (virtual) nodes): ht_internode_*.cu, after launchHTLayout for dispatch.
int launchHTInternodeDispatch(const HTDispatchParams& p, int numBlocks, cudaStream_t stream);
int launchHTInternodeCombine(const HTCombineParams& p, int numBlocks, cudaStream_t stream);
int launchHTInternodeCached(const HTCachedParams& p, int numBlocks, cudaStream_t stream);

}  // namespace ncclep
