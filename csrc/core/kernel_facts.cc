#include "core/kernel_facts.h"

#include <cstdio>
#include <cstring>

#include "common/device_error.h"
#include "core/config.h"
#include "core/last_error.h"
#include "kernels/limits.h"

namespace ncclep {
namespace {

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::string s = vformat(fmt, args);
  va_end(args);
  return s;
}

std::string llGap(const ncclepGroupConfig_t& c, int nRanks) {
  if (nRanks > kLLMaxRanks) return format("the LL kernels take at most %d ranks, got %d", kLLMaxRanks, nRanks);
  if (c.numExperts > kLLMaxExperts)
    return format("the LL kernels take at most %d experts, got %d", kLLMaxExperts, c.numExperts);
  if (c.maxTopk > kLLMaxTopk) return format("the LL kernels take max_topk <= %d, got %d", kLLMaxTopk, c.maxTopk);
  if (static_cast<long long>(c.maxTokensPerRank) * c.maxTopk > kLLMaxEntries)
    return format("the LL kernels take max_tokens_per_rank * max_topk <= %d, got %d * %d", kLLMaxEntries,
                  c.maxTokensPerRank, c.maxTopk);
  if (c.hidden % kLLHiddenMultiple != 0)
    return format("the LL kernels take hidden sizes divisible by %d, got %d", kLLHiddenMultiple, c.hidden);
  return "";
}

std::string htGap(const ncclepGroupConfig_t& c, int nRanks) {
  if (nRanks > kHTMaxRanks) return format("the HT kernels take at most %d ranks, got %d", kHTMaxRanks, nRanks);
  const int local = c.numExperts / nRanks;
  if (c.numExperts > kHTMaxExperts || local > kHTMaxLocalExperts)
    return format("the HT kernels take at most %d experts and %d per rank, got %d (%d per rank)", kHTMaxExperts,
                  kHTMaxLocalExperts, c.numExperts, local);
  if (c.maxTopk > kHTMaxTopk) return format("the HT kernels take max_topk <= %d, got %d", kHTMaxTopk, c.maxTopk);
  if (c.hidden % kHTHiddenMultiple != 0)
    return format("the HT kernels take hidden sizes divisible by %d, got %d", kHTHiddenMultiple, c.hidden);
  return "";
}

}  // namespace

std::string kernelSupportGap(const ncclepGroupConfig_t& config, const ncclepTopology_t& topology) {
  if (!topology.deviceApiAvailable) return "the NCCL device API is unavailable";
  if (topology.nLsaTeams > 1 && !topology.ginEnabled)
    return format("peers off the NVLink (LSA) team need GIN, which NCCL did not enable (%d LSA teams)",
                  topology.nLsaTeams);
  return config.mode == NCCLEP_MODE_LL ? llGap(config, topology.nRanks) : htGap(config, topology.nRanks);
}

long long htNumRows(const ncclepGroupConfig_t& config, int nRanks, int topk, int layout, int alignment) {
  const long long slots = static_cast<long long>(nRanks) * config.maxTokensPerRank;
  if (layout == NCCLEP_HT_LAYOUT_FLAT) return slots;
  const int local = config.numExperts / nRanks;
  const int copies = topk < local ? topk : local;
  return slots * copies + static_cast<long long>(local) * (alignment - 1);
}

int htKernelSms(int configSms, int deviceSms, bool hierarchical) {
  int sms = configSms > 0 ? configSms : kHTDefaultSms;
  if (sms > deviceSms) sms = deviceSms;
  const int least = hierarchical ? kHTMinSmsHierarchical : kHTMinSms;
  return sms < least ? least : sms;
}

void copyReason(const std::string& text, char* out, size_t bytes) {
  if (out == nullptr || bytes == 0) return;
  const size_t n = text.size() < bytes - 1 ? text.size() : bytes - 1;
  std::memcpy(out, text.data(), n);
  out[n] = '\0';
}

}  // namespace ncclep

using namespace ncclep;

extern "C" ncclepResult_t ncclepGetLimits(ncclepLimits_t* l) {
  if (l == nullptr) return setError(ncclepInvalidArgument, "ncclepGetLimits: limits is NULL");
  if (l->size != sizeof(ncclepLimits_t) || l->version != NCCLEP_LIMITS_VERSION)
    return setError(ncclepInvalidArgument,
                    "ncclepGetLimits: limits.size/version = %zu/%u, expected %zu/%u: initialise it with "
                    "NCCLEP_LIMITS_INITIALIZER",
                    l->size, l->version, sizeof(ncclepLimits_t), NCCLEP_LIMITS_VERSION);
  l->maxTopk = kMaxTopk;
  l->fp8Block = kFp8Block;
  l->llMaxRanks = kLLMaxRanks;
  l->llMaxExperts = kLLMaxExperts;
  l->llMaxTopk = kLLMaxTopk;
  l->llMaxEntries = kLLMaxEntries;
  l->llHiddenMultiple = kLLHiddenMultiple;
  l->htMaxRanks = kHTMaxRanks;
  l->htMaxExperts = kHTMaxExperts;
  l->htMaxLocalExperts = kHTMaxLocalExperts;
  l->htMaxTopk = kHTMaxTopk;
  l->htHiddenMultiple = kHTHiddenMultiple;
  l->htDefaultSms = kHTDefaultSms;
  l->htMinSms = kHTMinSms;
  l->htMinSmsHierarchical = kHTMinSmsHierarchical;
  return ncclepSuccess;
}

extern "C" ncclepResult_t ncclepQueryKernelSupport(const ncclepGroupConfig_t* config, const ncclepTopology_t* topology,
                                                   int* supported, char* why, size_t whyBytes) {
  if (supported == nullptr || topology == nullptr)
    return setError(ncclepInvalidArgument, "ncclepQueryKernelSupport: topology or supported is NULL");
  *supported = 0;
  if (topology->size != sizeof(ncclepTopology_t) || topology->version != NCCLEP_TOPOLOGY_VERSION)
    return setError(ncclepInvalidArgument,
                    "ncclepQueryKernelSupport: topology.size/version = %zu/%u, expected %zu/%u: initialise it "
                    "with NCCLEP_TOPOLOGY_INITIALIZER",
                    topology->size, topology->version, sizeof(ncclepTopology_t), NCCLEP_TOPOLOGY_VERSION);
  NCCLEP_CHECK(validateConfig(config, topology->nRanks));
  const std::string gap = kernelSupportGap(*config, *topology);
  copyReason(gap, why, whyBytes);
  *supported = gap.empty() ? 1 : 0;
  return ncclepSuccess;
}

extern "C" ncclepResult_t ncclepHTNumRowsFor(const ncclepGroupConfig_t* config, int nRanks, int topk, int layout,
                                             int alignment, long long* rows) {
  if (rows == nullptr) return setError(ncclepInvalidArgument, "ncclepHTNumRowsFor: rows is NULL");
  NCCLEP_CHECK(validateConfig(config, nRanks));
  if (topk < 1 || topk > config->maxTopk)
    return setError(ncclepInvalidArgument, "ncclepHTNumRowsFor: topk = %d: must be in [1, %d]", topk,
                    config->maxTopk);
  if (layout != NCCLEP_HT_LAYOUT_FLAT && layout != NCCLEP_HT_LAYOUT_EXPERT_MAJOR)
    return setError(ncclepInvalidArgument,
                    "ncclepHTNumRowsFor: layout = %d: must be NCCLEP_HT_LAYOUT_FLAT or _EXPERT_MAJOR", layout);
  if (alignment < 1 || (layout == NCCLEP_HT_LAYOUT_FLAT && alignment != 1))
    return setError(ncclepInvalidArgument,
                    "ncclepHTNumRowsFor: alignment = %d: must be >= 1, and 1 for the flat layout", alignment);
  *rows = htNumRows(*config, nRanks, topk, layout, alignment);
  return ncclepSuccess;
}

extern "C" const char* ncclepPhaseName(int phase) {
  switch (phase) {
    case kPhaseNone: return "no phase";
    case kPhaseLLDispatchSend: return "ll_dispatch send";
    case kPhaseLLDispatchRecv: return "ll_dispatch receive";
    case kPhaseLLCombineSend: return "ll_combine send";
    case kPhaseLLCombineRecv: return "ll_combine receive";
    case kPhaseHTLayout: return "ht_dispatch layout";
    case kPhaseHTDispatchSend: return "ht_dispatch send";
    case kPhaseHTDispatchRecv: return "ht_dispatch receive";
    case kPhaseHTCombineSend: return "ht_combine send";
    case kPhaseHTCombineRecv: return "ht_combine receive";
    case kPhaseHTCachedSend: return "ht_dispatch_cached send";
    case kPhaseHTCachedRecv: return "ht_dispatch_cached receive";
    case kPhaseHTForward: return "ht forward (hierarchical path)";
    default: return "unknown phase";
  }
}
