// What the LL and HT entry points check before touching a group.
#pragma once

#include "core/errors.h"
#include "core/group.h"

#include <cstddef>
#include <cstring>
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

// Copies an op's args (a versioned struct ending in rejectCode) into *out: the current version, or
// version 1, which ends where rejectCode begins and is read as a normal call (rejectCode 0).
template <typename Args>
ncclepResult_t readArgs(const Args* a, unsigned version, const char* call, Args* out) {
  NCCLEP_REQUIRE(a != nullptr, "%s: args is NULL", call);
  const size_t v1 = offsetof(Args, rejectCode);
  NCCLEP_REQUIRE((a->size == sizeof(Args) && a->version == version) || (a->size == v1 && a->version == 1u),
                 "%s: args.size/version = %zu/%u, expected %zu/%u (or %zu/1)", call, a->size, a->version,
                 sizeof(Args), version, v1);
  *out = Args{};
  std::memcpy(out, a, a->size);
  return ncclepSuccess;
}

// A rejected call (rejectCode != 0) names a known reason and launches both halves at once.
ncclepResult_t checkRejectCode(int rejectCode, int phases, const char* call);

}  // namespace ncclep
