#include "core/config.h"

#include <cmath>

#include "core/last_error.h"
#include "kernels/limits.h"

namespace ncclep {
namespace {

ncclepResult_t bad(const char* field, long long value, const char* rule) {
  return setError(ncclepInvalidArgument, "invalid ncclepGroupConfig_t.%s = %lld: %s", field, value, rule);
}

}  // namespace

ncclepResult_t validateConfig(const ncclepGroupConfig_t* c, int nRanks) {
  if (c == nullptr) return setError(ncclepInvalidArgument, "config is NULL");
  if (nRanks < 1) return setError(ncclepInvalidArgument, "nRanks = %d: must be >= 1", nRanks);
  if (c->magic != NCCLEP_GROUP_CONFIG_MAGIC)
    return setError(ncclepInvalidArgument,
                    "invalid ncclepGroupConfig_t.magic = 0x%x (expected 0x%x): initialise the config "
                    "with NCCLEP_GROUP_CONFIG_INITIALIZER",
                    c->magic, NCCLEP_GROUP_CONFIG_MAGIC);
  if (c->version != NCCLEP_GROUP_CONFIG_VERSION)
    return setError(ncclepInvalidArgument,
                    "unsupported ncclepGroupConfig_t.version = %u (this library knows version %u)",
                    c->version, NCCLEP_GROUP_CONFIG_VERSION);
  if (c->size != sizeof(ncclepGroupConfig_t))
    return setError(ncclepInvalidArgument,
                    "invalid ncclepGroupConfig_t.size = %zu (expected %zu for version %u)", c->size,
                    sizeof(ncclepGroupConfig_t), NCCLEP_GROUP_CONFIG_VERSION);

  if (c->mode != NCCLEP_MODE_LL && c->mode != NCCLEP_MODE_HT)
    return bad("mode", c->mode, "must be NCCLEP_MODE_LL (0) or NCCLEP_MODE_HT (1)");
  if (c->numExperts <= 0) return bad("numExperts", c->numExperts, "must be > 0");
  if (c->numExperts % nRanks != 0)
    return setError(ncclepInvalidArgument,
                    "invalid ncclepGroupConfig_t.numExperts = %d: must be a multiple of nRanks (%d)",
                    c->numExperts, nRanks);
  if (c->maxTokensPerRank <= 0) return bad("maxTokensPerRank", c->maxTokensPerRank, "must be > 0");
  if (c->hidden <= 0 || c->hidden % 8 != 0)
    return bad("hidden", c->hidden, "must be a positive multiple of 8 (16-byte bf16 rows)");
  if (c->maxTopk <= 0 || c->maxTopk > c->numExperts || c->maxTopk > kMaxTopk)
    return setError(ncclepInvalidArgument,
                    "invalid ncclepGroupConfig_t.maxTopk = %d: must be in [1, min(numExperts=%d, %d)]",
                    c->maxTopk, c->numExperts, kMaxTopk);
  if (c->numSms < 0) return bad("numSms", c->numSms, "must be >= 0 (0 = default)");
  if (!std::isfinite(c->timeoutSeconds) || c->timeoutSeconds <= 0.0)
    return setError(ncclepInvalidArgument,
                    "invalid ncclepGroupConfig_t.timeoutSeconds = %g: must be finite and > 0",
                    c->timeoutSeconds);
  if (c->virtualNodes < 0) return bad("virtualNodes", c->virtualNodes, "must be >= 0 (0/1 = off)");
  if (c->virtualNodes > 1 && nRanks % c->virtualNodes != 0)
    return setError(ncclepInvalidArgument,
                    "invalid ncclepGroupConfig_t.virtualNodes = %d: must divide nRanks (%d)",
                    c->virtualNodes, nRanks);
  // windowBytes is checked against the buffer plan by the caller.
  return ncclepSuccess;
}

}  // namespace ncclep
