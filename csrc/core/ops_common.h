// What the LL and HT entry points check before touching a group.
#pragma once

#include "core/errors.h"
#include "core/group.h"

#include <string>

#define NCCLEP_REQUIRE(cond, ...)                                             \
  do {                                                                        \
    if (!(cond)) return ncclep::setError(ncclepInvalidArgument, __VA_ARGS__); \
  } while (0)

namespace ncclep {

// Refuses calls on a NULL or broken group (an earlier wait timed out: its protocol state can no
// longer be trusted, so a timeout recorded on the device breaks it now), on a group made for the
// other mode, and on one without the NCCL device API.
ncclepResult_t checkGroupUsable(ncclepGroup* g, int mode, const char* call);

// "" when the group's kernels can serve it (device API up, topology and sizes within the kernels'
// limits, an HT window planned for its node count), else why not. The launchers refuse with it and
// ncclepGroupQueryKernelSupport reports it.
std::string groupKernelGap(const ncclepGroup* g);

// The group spans several (virtual) nodes: HT takes its hierarchical path.
bool hierarchical(const ncclepGroup* g);

// SMs the group's kernels use.
int groupKernelSms(const ncclepGroup* g);

}  // namespace ncclep
