#include "core/ops_common.h"

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
  if (!g->devCommCreated)
    return setError(ncclepUnsupported, "%s: the NCCL device API is unavailable on this group: %s", call,
                    g->deviceApiError.c_str());
  return ncclepSuccess;
}

}  // namespace ncclep
