#include "core/buffer_plan.h"

#include "core/config.h"
#include "core/errors.h"

namespace ncclep {
namespace {

bool addOk(size_t a, size_t b, size_t* out) { return !__builtin_add_overflow(a, b, out); }

}  // namespace

int plannedNodes(const ncclepGroupConfig_t& c, int nRanks) {
  return c.virtualNodes > 1 && nRanks % c.virtualNodes == 0 ? c.virtualNodes : 1;
}

ncclepResult_t planBuffers(const ncclepGroupConfig_t& c, int nRanks, int nodes, BufferPlan* plan) {
  BufferPlan p{};
  const int localExperts = c.numExperts / nRanks;
  size_t end = 0;
  bool ok;
  if (c.mode == NCCLEP_MODE_LL) {
    ok = planLLLayout(kControlBytes, nRanks, c.maxTokensPerRank, localExperts, c.maxTopk, c.hidden, &p.ll);
    end = p.ll.end;
  } else {
    ok = planHTLayout(kControlBytes, nRanks, c.maxTokensPerRank, c.numExperts, c.maxTopk, c.hidden, nodes, &p.ht);
    end = p.ht.end;
  }
  size_t total = 0;
  ok = ok && addOk(end, kWindowGranularity - 1, &total);
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
  NCCLEP_CHECK(ncclep::planBuffers(*config, nRanks, ncclep::plannedNodes(*config, nRanks), &plan));
  *bytes = plan.totalBytes;
  return ncclepSuccess;
  NCCLEP_API_CATCH
}
