// Host side of the HT calls: argument checks, the group's state, kernel launches.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "core/errors.h"
#include "core/group.h"
#include "core/kernel_facts.h"
#include "core/ops_common.h"
#include "kernels/ht/ht_params.h"

namespace ncclep {
namespace {

// Blocks that send (the rest receive). Dispatch: half. Combine: two thirds, because its send side
// (local reads, NVLink stores) is the slower one: on 4x H200 at 4096 tokens and 24 SMs, 12 / 16
// senders gave 736 / 636 us, while dispatch went from 640 to 817 us with 16. Tuning knobs:
// NCCLEP_HT_DISPATCH_SEND_BLOCKS, NCCLEP_HT_COMBINE_SEND_BLOCKS.
enum class HTOp { Dispatch, Combine };

int envBlocks(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : 0;
}

int sendBlocks(int blocks, HTOp op) {
  // Read at every call (a getenv is ~100 ns against a call of hundreds of µs), so one process can sweep.
  const int fromEnv =
      envBlocks(op == HTOp::Combine ? "NCCLEP_HT_COMBINE_SEND_BLOCKS" : "NCCLEP_HT_DISPATCH_SEND_BLOCKS");
  const int n = fromEnv > 0 ? fromEnv : (op == HTOp::Combine ? blocks * 2 / 3 : blocks / 2);
  return n < 1 ? 1 : (n > blocks - 1 ? blocks - 1 : n);
}

HTCommon common(const ncclepGroup* g, int blocks, HTOp op) {
  HTCommon c{};
  c.window = g->window;
  c.local = static_cast<char*>(g->windowPtr);
  c.layout = g->plan.ht;
  c.rank = g->rank;
  c.nRanks = g->nRanks;
  c.numExperts = g->config.numExperts;
  c.timeoutNs = uint64_t(g->config.timeoutSeconds * 1e9);
  c.error = g->errorDevice;
  c.sendBlocks = sendBlocks(blocks, op);
  if (hierarchical(g)) {  // a third each for sending and forwarding, the rest receive
    c.hier = 1;
    c.sendBlocks = blocks / 3 < 1 ? 1 : blocks / 3;
    c.forwardBlocks = c.sendBlocks;
    c.nodeSize = g->nodeSize;
    c.lsaRankOffset = g->rank - g->lsaRank;
    c.useGin = g->nLsaTeams > 1;
    c.devComm = g->devComm;
  }
  return c;
}

// An HT op's args: version 1 ends where rejectCode begins. Version 3 put recvTopkIdxBits in version
// 2's tail padding, so both have the same size; a version 2 caller may have left anything there,
// so whatever follows rejectCode reads as 0.
template <typename Args>
ncclepResult_t readHTArgs(const Args* a, const char* call, Args* out) {
  static_assert(NCCLEP_HT_ARGS_VERSION == 3u, "list each version's size");
  const size_t sizes[] = {offsetof(Args, rejectCode), sizeof(Args), sizeof(Args)};
  NCCLEP_CHECK(readArgs(a, sizes, call, out));
  if (a->version == 2) {
    const size_t end = offsetof(Args, rejectCode) + sizeof(out->rejectCode);
    std::memset(reinterpret_cast<char*>(out) + end, 0, sizeof(Args) - end);
  }
  return ncclepSuccess;
}

// recvTopkIdxBits of the dispatch and the combine: 0 (earlier versions) is 32.
ncclepResult_t recvTopkIdx64(int bits, const char* call, int* idx64) {
  NCCLEP_REQUIRE(bits == 0 || bits == 32 || bits == 64,
                 "%s: recvTopkIdxBits = %d: must be 32 or 64 (0 reads as 32)", call, bits);
  *idx64 = bits == 64;
  return ncclepSuccess;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

ncclepResult_t checkCommon(const ncclepGroup* g, int phases, int numTokens, int rejectCode, const char* call) {
  NCCLEP_REQUIRE(phases == NCCLEP_PHASE_ALL, "%s: phases = %d: HT calls take NCCLEP_PHASE_ALL only", call, phases);
  NCCLEP_CHECK(checkRejectCode(rejectCode, phases, call));
  if (rejectCode != 0) return ncclepSuccess;  // nothing else is read
  NCCLEP_REQUIRE(numTokens >= 0 && numTokens <= g->config.maxTokensPerRank,
                 "%s: numTokens = %d: must be in [0, maxTokensPerRank=%d]", call, numTokens,
                 g->config.maxTokensPerRank);
  return ncclepSuccess;
}

// The launch parameters of a normal call (rejectCode 0), after checking its arguments.
ncclepResult_t dispatchParams(const ncclepGroup* g, const ncclepHTDispatchArgs_t& a, const char* call,
                              HTDispatchParams* p) {
  const int H = a.hidden;
  NCCLEP_REQUIRE(H > 0 && H <= g->config.hidden && H % (a.useFp8 ? 128 : 8) == 0,
                 "%s: hidden = %d: must be a positive multiple of %d up to the group's %d", call, H,
                 a.useFp8 ? 128 : 8, g->config.hidden);
  NCCLEP_REQUIRE(!a.useFp8 || a.scaleBytes == 4 || a.scaleBytes == 1, "%s: scaleBytes = %d: must be 4 or 1", call,
                 a.scaleBytes);
  NCCLEP_REQUIRE(a.topk >= 1 && a.topk <= g->config.maxTopk, "%s: topk = %d: must be in [1, %d]", call, a.topk,
                 g->config.maxTopk);
  NCCLEP_REQUIRE(a.topkIdxBits == 32 || a.topkIdxBits == 64, "%s: topkIdxBits = %d: must be 32 or 64", call,
                 a.topkIdxBits);
  NCCLEP_CHECK(recvTopkIdx64(a.recvTopkIdxBits, call, &p->recvTopkIdx64));
  NCCLEP_REQUIRE(a.layout == NCCLEP_HT_LAYOUT_FLAT || a.layout == NCCLEP_HT_LAYOUT_EXPERT_MAJOR,
                 "%s: layout = %d: must be NCCLEP_HT_LAYOUT_FLAT or _EXPERT_MAJOR", call, a.layout);
  NCCLEP_REQUIRE(a.alignment >= 1 && (a.layout == NCCLEP_HT_LAYOUT_EXPERT_MAJOR || a.alignment == 1),
                 "%s: alignment = %d: must be >= 1, and 1 for the flat layout", call, a.alignment);
  const long long rows = htNumRows(g->config, g->nRanks, a.topk, a.layout, a.alignment);
  NCCLEP_REQUIRE(a.numRows == rows, "%s: numRows = %lld: this layout needs %lld", call, a.numRows, rows);
  NCCLEP_REQUIRE(rows <= 0x7fffffffLL, "%s: %lld output rows exceed the kernels' int range", call, rows);
  NCCLEP_REQUIRE(a.numTokens == 0 || (a.x && a.topkIdx && a.sendPos && (!a.useFp8 || a.xScales)),
                 "%s: x, topkIdx, sendPos (and xScales with fp8) are required", call);
  NCCLEP_REQUIRE(a.recvX && a.recvTopkIdx && a.numRecv && a.expertCounts && a.recvSlot && a.recvCounts &&
                     (!a.useFp8 || a.recvScales) && (!a.topkWeights || a.recvTopkWeights),
                 "%s: an output pointer is NULL", call);
  NCCLEP_REQUIRE(aligned16(a.x) && aligned16(a.recvX), "%s: x and recvX must be 16-byte aligned", call);
  p->x = a.x;
  p->xScales = a.xScales;
  p->rowBytes = a.useFp8 ? H : H * 2;
  p->scaleRowBytes = a.useFp8 ? (H / 128) * a.scaleBytes : 0;
  p->scaleWordBytes = a.useFp8 ? a.scaleBytes : 0;
  p->topkIdx = a.topkIdx;
  p->topkIdx64 = a.topkIdxBits == 64;
  p->topkWeights = a.topkWeights;
  p->numTokens = a.numTokens;
  p->topk = a.topk;
  p->expertMajor = a.layout == NCCLEP_HT_LAYOUT_EXPERT_MAJOR;
  p->alignment = a.alignment;
  p->numRows = int(rows);
  p->recvX = a.recvX;
  p->recvScales = a.recvScales;
  p->recvTopkIdx = a.recvTopkIdx;
  // An empty topk_weights (no tokens here) may be NULL: what we receive still carries weights.
  p->recvTopkWeights = a.recvTopkWeights;
  p->numRecv = a.numRecv;
  p->expertCounts = a.expertCounts;
  p->sendPos = a.sendPos;
  p->recvSlot = a.recvSlot;
  p->recvCounts = a.recvCounts;
  return ncclepSuccess;
}

ncclepResult_t combineParams(const ncclepGroup* g, const ncclepHTCombineArgs_t& a, const char* call,
                             HTCombineParams* p) {
  NCCLEP_REQUIRE(a.hidden > 0 && a.hidden % 8 == 0 && a.hidden <= g->config.hidden,
                 "%s: hidden = %d: must be a positive multiple of 8 up to the group's %d", call, a.hidden,
                 g->config.hidden);
  NCCLEP_REQUIRE(a.topk >= 1 && a.topk <= g->config.maxTopk, "%s: topk = %d: must be in [1, %d]", call, a.topk,
                 g->config.maxTopk);
  NCCLEP_CHECK(recvTopkIdx64(a.recvTopkIdxBits, call, &p->recvTopkIdx64));
  // Fewer rows than the dispatch's N are allowed: the rows past them hold no token (the exact
  // rows of a flat dispatch), so neither the row inversion nor the sums read them.
  NCCLEP_REQUIRE(a.numRows >= 0 && a.numRows <= 0x7fffffffLL, "%s: numRows = %lld: must be in [0, 2^31)", call,
                 a.numRows);
  NCCLEP_REQUIRE((a.x || a.numRows == 0) && a.recvSlot && a.recvCounts && (!a.topkWeights || a.recvTopkIdx),
                 "%s: x and the handle are required", call);
  NCCLEP_REQUIRE(a.numTokens == 0 || (a.sendPos && a.out && (!a.topkWeights || a.outWeights)),
                 "%s: sendPos and out (and outWeights with topkWeights) are required", call);
  NCCLEP_REQUIRE(!a.outWeights || a.topkWeights || a.numRows == 0, "%s: outWeights needs topkWeights", call);
  NCCLEP_REQUIRE(aligned16(a.x) && aligned16(a.out), "%s: x and out must be 16-byte aligned", call);
  p->x = a.x;
  p->hidden = a.hidden;
  p->topkWeights = a.topkWeights;
  p->topk = a.topk;
  p->sendPos = a.sendPos;
  p->recvSlot = a.recvSlot;
  p->recvCounts = a.recvCounts;
  p->recvTopkIdx = a.recvTopkIdx;
  p->numTokens = a.numTokens;
  p->numRows = int(a.numRows);
  p->out = a.out;
  // Each side by its own pointer: a rank with no rows has no topkWeights (an empty tensor has no
  // address) but still sums the weights its tokens' rows carry from the peers.
  p->outWeights = a.outWeights;
  return ncclepSuccess;
}

ncclepResult_t cachedParams(const ncclepGroup* g, const ncclepHTCachedDispatchArgs_t& a, const char* call,
                            HTCachedParams* p) {
  NCCLEP_REQUIRE(a.rowBytes > 0 && a.rowBytes <= int(g->plan.ht.flagOffset),
                 "%s: rowBytes = %d: must be in [1, %u]", call, a.rowBytes, g->plan.ht.flagOffset);
  const long long flat = htNumRows(g->config, g->nRanks, 1, NCCLEP_HT_LAYOUT_FLAT, 1);
  NCCLEP_REQUIRE(a.numRows >= flat && a.numRows <= 0x7fffffffLL, "%s: numRows = %lld: must be at least %lld", call,
                 a.numRows, flat);
  NCCLEP_REQUIRE(a.recvSlot && a.out, "%s: recvSlot and out are required", call);
  NCCLEP_REQUIRE(a.numTokens == 0 || (a.x && a.sendPos), "%s: x and sendPos are required", call);
  p->x = a.x;
  p->rowBytes = a.rowBytes;
  p->numTokens = a.numTokens;
  p->numRows = int(a.numRows);
  p->sendPos = a.sendPos;
  p->recvSlot = a.recvSlot;
  p->out = a.out;
  return ncclepSuccess;
}

}  // namespace
}  // namespace ncclep

using namespace ncclep;

extern "C" ncclepResult_t ncclepHTNumRows(ncclepGroup_t g, int topk, int layout, int alignment, long long* rows) {
  if (g == nullptr || rows == nullptr) return setError(ncclepInvalidArgument, "ncclepHTNumRows: group or rows is NULL");
  NCCLEP_REQUIRE(topk >= 1 && topk <= g->config.maxTopk, "ncclepHTNumRows: topk = %d: must be in [1, %d]", topk,
                 g->config.maxTopk);
  NCCLEP_REQUIRE(layout == NCCLEP_HT_LAYOUT_FLAT || layout == NCCLEP_HT_LAYOUT_EXPERT_MAJOR,
                 "ncclepHTNumRows: layout = %d: must be NCCLEP_HT_LAYOUT_FLAT or _EXPERT_MAJOR", layout);
  NCCLEP_REQUIRE(alignment >= 1 && (layout == NCCLEP_HT_LAYOUT_EXPERT_MAJOR || alignment == 1),
                 "ncclepHTNumRows: alignment = %d: must be >= 1, and 1 for the flat layout", alignment);
  *rows = htNumRows(g->config, g->nRanks, topk, layout, alignment);
  return ncclepSuccess;
}

extern "C" ncclepResult_t ncclepHTMaxRowBytes(ncclepGroup_t g, int* bytes) {
  if (g == nullptr || bytes == nullptr)
    return setError(ncclepInvalidArgument, "ncclepHTMaxRowBytes: group or bytes is NULL");
  if (g->config.mode != NCCLEP_MODE_HT)
    return setError(ncclepInvalidUsage, "ncclepHTMaxRowBytes: the group was created for LL mode");
  *bytes = int(g->plan.ht.flagOffset);
  return ncclepSuccess;
}

extern "C" ncclepResult_t ncclepHTDispatch(ncclepGroup_t g, const ncclepHTDispatchArgs_t* args, cudaStream_t stream) {
  NCCLEP_API_TRY
  const char* call = "ncclepHTDispatch";
  NCCLEP_CHECK(checkGroupUsable(g, NCCLEP_MODE_HT, call));
  ncclepHTDispatchArgs_t a;
  NCCLEP_CHECK(readHTArgs(args, call, &a));
  NCCLEP_CHECK(checkCommon(g, a.phases, a.numTokens, a.rejectCode, call));
  const int blocks = groupKernelSms(g);
  HTDispatchParams p{};
  p.c = common(g, blocks, HTOp::Dispatch);
  p.rejectCode = a.rejectCode;  // rejected: no token; the layout step and the kernel carry the code
  if (a.rejectCode == 0) NCCLEP_CHECK(dispatchParams(g, a, call, &p));
  DeviceGuard guard;
  NCCLEP_CHECK(guard.set(g->cudaDevice));
  NCCLEP_CUDA_CHECK(cudaError_t(launchHTLayout(p, blocks, stream)), "launching the HT layout kernel");
  if (hierarchical(g))
    NCCLEP_CUDA_CHECK(cudaError_t(launchHTInternodeDispatch(p, blocks, stream)),
                      "launching the HT internode dispatch kernel");
  else
    NCCLEP_CUDA_CHECK(cudaError_t(launchHTDispatch(p, blocks, stream)), "launching the HT dispatch kernel");
  return ncclepSuccess;
  NCCLEP_API_CATCH
}

extern "C" ncclepResult_t ncclepHTCombine(ncclepGroup_t g, const ncclepHTCombineArgs_t* args, cudaStream_t stream) {
  NCCLEP_API_TRY
  const char* call = "ncclepHTCombine";
  NCCLEP_CHECK(checkGroupUsable(g, NCCLEP_MODE_HT, call));
  ncclepHTCombineArgs_t a;
  NCCLEP_CHECK(readHTArgs(args, call, &a));
  NCCLEP_CHECK(checkCommon(g, a.phases, a.numTokens, a.rejectCode, call));
  const int blocks = groupKernelSms(g);
  HTCombineParams p{};
  p.c = common(g, blocks, HTOp::Combine);
  p.rejectCode = a.rejectCode;  // rejected: no row, no handle; reject flags where the rows would go
  if (a.rejectCode == 0) NCCLEP_CHECK(combineParams(g, a, call, &p));
  DeviceGuard guard;
  NCCLEP_CHECK(guard.set(g->cudaDevice));
  if (hierarchical(g))
    NCCLEP_CUDA_CHECK(cudaError_t(launchHTInternodeCombine(p, blocks, stream)),
                      "launching the HT internode combine kernels");
  else
    NCCLEP_CUDA_CHECK(cudaError_t(launchHTCombine(p, blocks, stream)), "launching the HT combine kernels");
  return ncclepSuccess;
  NCCLEP_API_CATCH
}

extern "C" ncclepResult_t ncclepHTCachedDispatch(ncclepGroup_t g, const ncclepHTCachedDispatchArgs_t* args,
                                                 cudaStream_t stream) {
  NCCLEP_API_TRY
  const char* call = "ncclepHTCachedDispatch";
  NCCLEP_CHECK(checkGroupUsable(g, NCCLEP_MODE_HT, call));
  ncclepHTCachedDispatchArgs_t a;
  NCCLEP_CHECK(readHTArgs(args, call, &a));
  NCCLEP_CHECK(checkCommon(g, a.phases, a.numTokens, a.rejectCode, call));
  const int blocks = groupKernelSms(g);
  HTCachedParams p{};
  p.c = common(g, blocks, HTOp::Dispatch);
  p.rejectCode = a.rejectCode;  // rejected: no row, no handle; reject flags where the rows would go
  if (a.rejectCode == 0) NCCLEP_CHECK(cachedParams(g, a, call, &p));
  DeviceGuard guard;
  NCCLEP_CHECK(guard.set(g->cudaDevice));
  if (hierarchical(g))
    NCCLEP_CUDA_CHECK(cudaError_t(launchHTInternodeCached(p, blocks, stream)),
                      "launching the HT internode cached dispatch kernel");
  else
    NCCLEP_CUDA_CHECK(cudaError_t(launchHTCached(p, blocks, stream)), "launching the HT cached dispatch kernel");
  return ncclepSuccess;
  NCCLEP_API_CATCH
}
