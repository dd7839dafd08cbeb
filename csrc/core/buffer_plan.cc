#include "core/buffer_plan.h"

#include "core/config.h"
#include "core/errors.h"

namespace ncclep {
namespace {

constexpr int kParities = 2;  // LL double buffering

bool mulOk(size_t a, size_t b, size_t* out) { return !__builtin_mul_overflow(a, b, out); }
bool addOk(size_t a, size_t b, size_t* out) { return !__builtin_add_overflow(a, b, out); }
size_t roundUp(size_t x, size_t to) { return (x + to - 1) / to * to; }

}  // namespace

ncclepResult_t planBuffers(const ncclepGroupConfig_t& c, int nRanks, BufferPlan* plan) {
  BufferPlan p{};
  p.dispatchMsgBytes = roundUp(size_t(c.hidden) * 2 + 16 + size_t(c.maxTopk) * 8, 16);
  p.combineMsgBytes = roundUp(size_t(c.hidden) * 2, 16);

  size_t slots = 0;
  bool ok = mulOk(size_t(kParities) * size_t(nRanks), size_t(c.maxTokensPerRank), &slots) &&
            mulOk(slots, p.dispatchMsgBytes, &p.dispatchBytes) &&
            mulOk(slots, p.combineMsgBytes, &p.combineBytes);
  p.dispatchOffset = kControlBytes;
  size_t total = 0;
  ok = ok && addOk(p.dispatchOffset, p.dispatchBytes, &p.combineOffset) &&
       addOk(p.combineOffset, p.combineBytes, &total) &&
       addOk(total, kWindowGranularity - 1, &total);
  if (ok && c.mode == NCCLEP_MODE_LL) {
    ok = planLLLayout(kControlBytes, nRanks, c.maxTokensPerRank, c.numExperts / nRanks, c.maxTopk, c.hidden, &p.ll) &&
         addOk(p.ll.end, kWindowGranularity - 1, &total);
  }
  if (!ok)
    return setError(ncclepInvalidArgument,
                    "buffer plan overflows size_t (nRanks=%d, maxTokensPerRank=%d, hidden=%d, maxTopk=%d)",
                    nRanks, c.maxTokensPerRank, c.hidden, c.maxTopk);
  p.totalBytes = total / kWindowGranularity * kWindowGranularity;
  *plan = p;
  return ncclepSuccess;
}

}  // namespace ncclep

extern "C" ncclepResult_t ncclepComputeWindowBytes(const ncclepGroupConfig_t* config, int nRanks,
                                                   size_t* bytes) {
  NCCLEP_API_TRY
  if (bytes == nullptr) return ncclep::setError(ncclepInvalidArgument, "ncclepComputeWindowBytes: bytes is NULL");
  NCCLEP_CHECK(ncclep::validateConfig(config, nRanks));
  ncclep::BufferPlan plan;
  NCCLEP_CHECK(ncclep::planBuffers(*config, nRanks, &plan));
  *bytes = plan.totalBytes;
  return ncclepSuccess;
  NCCLEP_API_CATCH
}
