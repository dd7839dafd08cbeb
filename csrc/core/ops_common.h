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

// Copies an op's args (a versioned struct: each version adds fields at the end) into *out, fields
// a caller's version lacks as 0. sizes[v - 1] is version v's sizeof; the last is the current one.
template <typename Args, size_t N>
ncclepResult_t readArgs(const Args* a, const size_t (&sizes)[N], const char* call, Args* out) {
  NCCLEP_REQUIRE(a != nullptr, "%s: args is NULL", call);
  static_assert(N >= 1, "at least the current version");
  const unsigned v = a->version;
  NCCLEP_REQUIRE(v >= 1 && v <= N && a->size == sizes[v - 1],
                 "%s: args.size/version = %zu/%u, expected %zu/%zu (or an earlier version's size)", call, a->size,
                 a->version, sizes[N - 1], N);
  *out = Args{};
  std::memcpy(out, a, a->size);
  return ncclepSuccess;
}

// A rejected call (rejectCode != 0) names a known reason and launches both halves at once.
ncclepResult_t checkRejectCode(int rejectCode, int phases, const char* call);

}  // namespace ncclep
