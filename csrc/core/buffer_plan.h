// Layout of the symmetric window.
//
//   [0, kControlBytes)                 bring-up check area (upper half), spare
//   LL: [kControlBytes, ll.end)        the LL protocol's regions (kernels/ll/ll_layout.h)
//   HT: [kControlBytes, ht.end)        the HT protocol's regions (kernels/ht/ht_layout.h)
#pragma once

#include <cstddef>

#include "kernels/ht/ht_layout.h"
#include "kernels/ll/ll_layout.h"
#include "ncclep.h"

namespace ncclep {

constexpr size_t kControlBytes = 64 << 10;
// Inside the control region: the LSA bring-up check uses the upper half.
constexpr size_t kBringupOffset = 32 << 10;
constexpr size_t kBringupBytes = 32 << 10;
// Window sizes are rounded to this (ncclMemAlloc's usual granularity; also a
// multiple of NCCL_WIN_REQUIRED_ALIGNMENT).
constexpr size_t kWindowGranularity = 2 << 20;

struct BufferPlan {
  LLLayout ll;        // LL mode only
  HTLayout ht;        // HT mode only
  size_t totalBytes;  // rounded up to kWindowGranularity
};

// Expects a validated config. `nodes` > 1: the (virtual) nodes the group spans, for the HT
// hierarchical regions. Fails (InvalidArgument) only on size overflow.
ncclepResult_t planBuffers(const ncclepGroupConfig_t& config, int nRanks, int nodes, BufferPlan* plan);

// The nodes a config plans for: its virtualNodes (the group also reads NCCLEP_VIRTUAL_NODES).
int plannedNodes(const ncclepGroupConfig_t& config, int nRanks);

}  // namespace ncclep
