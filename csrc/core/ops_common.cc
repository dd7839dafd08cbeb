#include "core/ops_common.h"

#include <cstdio>

#include "core/kernel_facts.h"

namespace ncclep {

ncclepResult_t checkGroupUsable(ncclepGroup* g, int mode, const char* call) {
  if (g == nullptr) return setError(ncclepInvalidArgument, "%s: group is NULL", call);
  if (g->broken) return setError(ncclepInvalidUsage, "%s: the group is broken (an earlier wait timed out)", call);
  const volatile DeviceError* word = g->errorHost;
  const DeviceError e{word->code, word->phase, word->peer, word->value};
  if (e.code == kDeviceTimeout || e.code == kDeviceProtocol) {
    g->broken = true;
    return setError(ncclepTimeout,
                    "%s: an earlier call's wait timed out (phase %d, peer %d): the group can only be destroyed", call,
                    e.phase, e.peer);
  }
  if (g->config.mode != mode)
    return setError(ncclepInvalidUsage, "%s: the group was created for %s mode", call,
                    g->config.mode == NCCLEP_MODE_LL ? "LL" : "HT");
  if (!g->kernelGapKnown) {
    g->kernelGap = groupKernelGap(g);
    g->kernelGapKnown = true;
  }
  if (!g->kernelGap.empty()) return setError(ncclepUnsupported, "%s: %s", call, g->kernelGap.c_str());
  return ncclepSuccess;
}

bool hierarchical(const ncclepGroup* g) { return g->nodeSize > 0 && g->nodeSize < g->nRanks; }

std::string groupKernelGap(const ncclepGroup* g) {
  if (!g->devCommCreated) return "the NCCL device API is unavailable on this group: " + g->deviceApiError;
  ncclepTopology_t topology = NCCLEP_TOPOLOGY_INITIALIZER;
  topology.nRanks = g->nRanks;
  topology.nLsaTeams = g->nLsaTeams;
  topology.ginEnabled = g->ginEnabled ? 1 : 0;
  topology.deviceApiAvailable = 1;
  std::string gap = kernelSupportGap(g->config, topology);
  if (gap.empty() && g->config.mode == NCCLEP_MODE_HT && hierarchical(g) &&
      g->plan.ht.nodes != g->nRanks / g->nodeSize) {
    char buf[256];
    std::snprintf(buf, sizeof(buf),
                  "the group spans %d nodes but its window was planned for %d (a windowBytes too small for the "
                  "HT hierarchical regions of that many nodes)",
                  g->nRanks / g->nodeSize, g->plan.ht.nodes);
    gap = buf;
  }
  return gap;
}

ncclepResult_t checkRejectCode(int rejectCode, int phases, const char* call) {
  NCCLEP_REQUIRE(rejectCode >= 0 && rejectCode < ncclepNumRejectReasons,
                 "%s: rejectCode = %d: must be 0 or an ncclepRejectReason_t (< %d)", call, rejectCode,
                 int(ncclepNumRejectReasons));
  NCCLEP_REQUIRE(rejectCode == 0 || phases == NCCLEP_PHASE_ALL,
                 "%s: a rejected call (rejectCode %d) takes NCCLEP_PHASE_ALL, got phases = %d", call, rejectCode,
                 phases);
  return ncclepSuccess;
}

int groupKernelSms(const ncclepGroup* g) {
  if (g->config.mode == NCCLEP_MODE_HT) return htKernelSms(g->config.numSms, g->deviceSms, hierarchical(g));
  return g->config.numSms > 0 && g->config.numSms < g->deviceSms ? g->config.numSms : g->deviceSms;
}

}  // namespace ncclep

extern "C" ncclepResult_t ncclepGroupQueryKernelSupport(ncclepGroup_t g, int* supported, char* why, size_t whyBytes) {
  if (g == nullptr || supported == nullptr)
    return ncclep::setError(ncclepInvalidArgument, "ncclepGroupQueryKernelSupport: group or supported is NULL");
  const std::string gap = ncclep::groupKernelGap(g);
  ncclep::copyReason(gap, why, whyBytes);
  *supported = gap.empty() ? 1 : 0;
  return ncclepSuccess;
}
