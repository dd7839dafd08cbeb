// Validation of ncclepGroupConfig_t (the versioned, user-supplied group config).
#pragma once

#include "ncclep.h"

namespace ncclep {

// Checks the struct header (size/magic/version) and every field against nRanks.
// On failure returns ncclepInvalidArgument with a last-error message naming the field.
ncclepResult_t validateConfig(const ncclepGroupConfig_t* config, int nRanks);

}  // namespace ncclep
