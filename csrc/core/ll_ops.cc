// Host side of the LL calls: argument checks, the group's state, kernel launch.
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "core/errors.h"
#include "core/group.h"
#include "core/ops_common.h"
#include "kernels/ll/ll_params.h"

namespace ncclep {
namespace {

ncclepResult_t checkHidden(const ncclepGroup* g, int hidden, const char* call) {
  if (hidden <= 0 || hidden % 128 != 0 || hidden > g->config.hidden)
    return setError(ncclepInvalidArgument, "%s: hidden = %d: must be a positive multiple of 128 up to the group's %d",
                    call, hidden, g->config.hidden);
  return ncclepSuccess;
}

ncclepResult_t checkPhases(int phases, const char* call) {
  if (phases < 1 || phases > NCCLEP_PHASE_ALL)
    return setError(ncclepInvalidArgument, "%s: phases = %d: must be a non-empty set of NCCLEP_PHASE_*", call, phases);
  return ncclepSuccess;
}

LLCommon common(const ncclepGroup* g) {
  LLCommon c{};
  c.window = g->window;
  c.local = static_cast<char*>(g->windowPtr);
  c.layout = g->plan.ll;
  c.rank = g->rank;
  c.nRanks = g->nRanks;
  c.numExperts = g->config.numExperts;
  c.timeoutNs = uint64_t(g->config.timeoutSeconds * 1e9);
  c.error = g->errorDevice;
  c.nodeSize = g->nodeSize;
  c.lsaRankOffset = g->rank - g->lsaRank;
  c.useGin = g->nLsaTeams > 1;
  c.devComm = g->devComm;
  return c;
}

}  // namespace
}  // namespace ncclep

using namespace ncclep;

extern "C" ncclepResult_t ncclepLLDispatch(ncclepGroup_t g, const ncclepLLDispatchArgs_t* args, cudaStream_t stream) {
  NCCLEP_API_TRY
  const char* call = "ncclepLLDispatch";
  NCCLEP_CHECK(checkGroupUsable(g, NCCLEP_MODE_LL, call));
  ncclepLLDispatchArgs_t a;
  static_assert(NCCLEP_LL_ARGS_VERSION == 5u, "list each version's size");
  static_assert(offsetof(ncclepLLDispatchArgs_t, pow2Scales) ==
                    offsetof(ncclepLLDispatchArgs_t, recvScalesStrides) + sizeof(long long[3]),
                "a version 4 struct ends where pow2Scales begins (no tail padding of it to clear)");
  const size_t sizes[] = {offsetof(ncclepLLDispatchArgs_t, rejectCode),
                          offsetof(ncclepLLDispatchArgs_t, recvScalesStrides),
                          offsetof(ncclepLLDispatchArgs_t, pow2Scales),
                          offsetof(ncclepLLDispatchArgs_t, pow2Scales),  // version 4 changed only the combine
                          sizeof(ncclepLLDispatchArgs_t)};
  NCCLEP_CHECK(readArgs(args, sizes, call, &a));
  NCCLEP_CHECK(checkPhases(a.phases, call));
  NCCLEP_CHECK(checkRejectCode(a.rejectCode, a.phases, call));
  LLDispatchParams p{};
  p.c = common(g);
  p.phases = a.phases;
  p.rejectCode = a.rejectCode;
  if (a.rejectCode != 0) {  // no token: the counts carry the code, the receive half only keeps count
    p.hidden = g->config.hidden;
    p.topk = 1;
  } else {
    NCCLEP_CHECK(checkHidden(g, a.hidden, call));
    NCCLEP_REQUIRE(a.numTokens >= 0 && a.numTokens <= g->config.maxTokensPerRank,
                   "%s: numTokens = %d: must be in [0, maxTokensPerRank=%d]", call, a.numTokens,
                   g->config.maxTokensPerRank);
    NCCLEP_REQUIRE(a.topk >= 1 && a.topk <= g->config.maxTopk, "%s: topk = %d: must be in [1, %d]", call, a.topk,
                   g->config.maxTopk);
    NCCLEP_REQUIRE(a.topkIdxBits == 32 || a.topkIdxBits == 64, "%s: topkIdxBits = %d: must be 32 or 64", call,
                   a.topkIdxBits);
    NCCLEP_REQUIRE(!a.ue8m0 || a.useFp8, "%s: ue8m0 needs useFp8", call);
    NCCLEP_REQUIRE(!a.pow2Scales || (a.useFp8 && !a.ue8m0),
                   "%s: pow2Scales needs useFp8 and not ue8m0 (whose scales are powers of two already)", call);
    if (a.phases & NCCLEP_PHASE_SEND) {
      NCCLEP_REQUIRE(a.numTokens == 0 || (a.x && a.topkIdx && a.topkWeights),
                     "%s: x, topkIdx and topkWeights are required", call);
      NCCLEP_REQUIRE(a.numTokens == 0 || a.sendSlots, "%s: sendSlots is required", call);
    }
    if (a.phases & NCCLEP_PHASE_RECV)
      NCCLEP_REQUIRE(a.recvX && a.expertCounts && a.recvRows && a.recvWeights && a.recvSlotCounts &&
                         (!a.useFp8 || a.recvScales),
                     "%s: an output pointer is NULL", call);
    const long long* st = a.recvScalesStrides;
    p.scalesStrided = st[0] != 0 || st[1] != 0 || st[2] != 0;
    if (p.scalesStrided && (a.phases & NCCLEP_PHASE_RECV)) {
      NCCLEP_REQUIRE(a.useFp8, "%s: recvScalesStrides are for fp8 scales (useFp8)", call);
      NCCLEP_REQUIRE(st[0] >= 0 && st[1] >= 0 && st[2] >= 0, "%s: recvScalesStrides = {%lld, %lld, %lld}: must be >= 0",
                     call, st[0], st[1], st[2]);
      NCCLEP_REQUIRE(!a.ue8m0 || (a.hidden / 128) % 4 == 0,
                     "%s: hidden = %d: strided UE8M0 scales move as words of four exponents, so hidden must be a "
                     "multiple of 512",
                     call, a.hidden);
      NCCLEP_REQUIRE(reinterpret_cast<uintptr_t>(a.recvScales) % 4 == 0,
                     "%s: recvScales must be 4-byte aligned when strided", call);
    }
    for (int i = 0; i < 3; ++i) p.scalesStrides[i] = st[i];
    p.x = a.x;
    p.topkIdx = a.topkIdx;
    p.topkIdx64 = a.topkIdxBits == 64;
    p.topkWeights = a.topkWeights;
    p.numTokens = a.numTokens;
    p.hidden = a.hidden;
    p.topk = a.topk;
    p.useFp8 = a.useFp8;
    p.ue8m0 = a.ue8m0;
    p.pow2Scales = a.pow2Scales;
    p.recvX = a.recvX;
    p.recvScales = a.recvScales;
    p.expertCounts = a.expertCounts;
    p.sendSlots = a.sendSlots;
    p.recvRows = a.recvRows;
    p.recvWeights = a.recvWeights;
    p.recvSlotCounts = a.recvSlotCounts;
    p.trace = a.trace;
  }
  DeviceGuard guard;
  NCCLEP_CHECK(guard.set(g->cudaDevice));
  NCCLEP_CUDA_CHECK(cudaError_t(launchLLDispatch(p, groupKernelSms(g), stream)), "launching the LL dispatch kernel");
  return ncclepSuccess;
  NCCLEP_API_CATCH
}

extern "C" ncclepResult_t ncclepLLCombine(ncclepGroup_t g, const ncclepLLCombineArgs_t* args, cudaStream_t stream) {
  NCCLEP_API_TRY
  const char* call = "ncclepLLCombine";
  NCCLEP_CHECK(checkGroupUsable(g, NCCLEP_MODE_LL, call));
  ncclepLLCombineArgs_t a;
  const size_t sizes[] = {offsetof(ncclepLLCombineArgs_t, rejectCode), offsetof(ncclepLLCombineArgs_t, topkWeights),
                          offsetof(ncclepLLCombineArgs_t, topkWeights),  // version 3 changed only the dispatch
                          sizeof(ncclepLLCombineArgs_t),
                          sizeof(ncclepLLCombineArgs_t)};  // version 5 changed only the dispatch
  NCCLEP_CHECK(readArgs(args, sizes, call, &a));
  NCCLEP_CHECK(checkPhases(a.phases, call));
  NCCLEP_CHECK(checkRejectCode(a.rejectCode, a.phases, call));
  LLCombineParams p{};
  p.c = common(g);
  p.phases = a.phases;
  p.rejectCode = a.rejectCode;
  if (a.rejectCode != 0) {  // no row: a status word and a signal per peer, then wait for the peers
    p.hidden = g->config.hidden;
  } else {
    NCCLEP_CHECK(checkHidden(g, a.hidden, call));
    NCCLEP_REQUIRE(a.numTokens >= 0 && a.numTokens <= g->config.maxTokensPerRank,
                   "%s: numTokens = %d: must be in [0, maxTokensPerRank=%d]", call, a.numTokens,
                   g->config.maxTokensPerRank);
    if (a.phases & NCCLEP_PHASE_SEND)
      NCCLEP_REQUIRE(a.expertOut && a.recvRows && a.recvWeights && a.recvSlotCounts,
                     "%s: expertOut and the handle are required", call);
    if (a.phases & NCCLEP_PHASE_RECV)
      NCCLEP_REQUIRE(a.numTokens == 0 || (a.sendSlots && a.out), "%s: sendSlots and out are required", call);
    NCCLEP_REQUIRE(a.topk >= 0 && a.topk <= g->config.maxTopk, "%s: topk = %d: must be in [0, %d]", call, a.topk,
                   g->config.maxTopk);
    if (a.topk > 0) {
      NCCLEP_REQUIRE(a.phases & NCCLEP_PHASE_SEND, "%s: topkWeights go with the send half", call);
      NCCLEP_REQUIRE(a.numTokens == 0 || (a.topkWeights && a.sendSlots), "%s: topkWeights and sendSlots are required",
                     call);
    }
    p.topkWeights = a.topkWeights;
    p.topk = a.topk;
    p.expertOut = a.expertOut;
    p.hidden = a.hidden;
    p.numTokens = a.numTokens;
    p.sendSlots = a.sendSlots;
    p.recvRows = a.recvRows;
    p.recvWeights = a.recvWeights;
    p.recvSlotCounts = a.recvSlotCounts;
    p.out = a.out;
  }
  DeviceGuard guard;
  NCCLEP_CHECK(guard.set(g->cudaDevice));
  NCCLEP_CUDA_CHECK(cudaError_t(launchLLCombine(p, groupKernelSms(g), stream)), "launching the LL combine kernel");
  return ncclepSuccess;
  NCCLEP_API_CATCH
}

extern "C" ncclepResult_t ncclepGroupGetDeviceError(ncclepGroup_t g, ncclepDeviceError_t* out) {
  if (g == nullptr || out == nullptr)
    return setError(ncclepInvalidArgument, "ncclepGroupGetDeviceError: group or error is NULL");
  static_assert(sizeof(ncclepDeviceError_t) == sizeof(DeviceError), "error word layout");
  volatile DeviceError* word = g->errorHost;
  DeviceError e{word->code, word->phase, word->peer, word->value};
  std::memcpy(out, &e, sizeof(e));
  if (e.code == kDeviceBadExpert || e.code == kDeviceDuplicateExpert || e.code == kDevicePeerRejected) {
    word->phase = 0;
    word->peer = 0;
    word->value = 0;
    word->code = 0;
  }
  return ncclepSuccess;
}
