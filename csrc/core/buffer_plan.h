// Layout of the symmetric window.
//
//   [0, kControlBytes)                 bring-up check area (upper half), spare
//   LL: [kControlBytes, ll.end)        the LL protocol's regions (kernels/ll/ll_layout.h)
//   HT: [kControlBytes, ...)           PROVISIONAL placeholder (dispatch and combine slots of LL's
//                                      shape) until the HT kernels exist
#pragma once

#include <cstddef>

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
  size_t dispatchMsgBytes;  // one dispatched token: hidden*2 + 16 (header) + maxTopk*8, rounded to 16
  size_t combineMsgBytes;   // one combined token: hidden*2, rounded to 16
  size_t dispatchOffset, dispatchBytes;
  size_t combineOffset, combineBytes;
  LLLayout ll;              // LL mode only
  size_t totalBytes;        // rounded up to kWindowGranularity
};

// Expects a validated config. Fails (InvalidArgument) only on size overflow.
ncclepResult_t planBuffers(const ncclepGroupConfig_t& config, int nRanks, BufferPlan* plan);

}  // namespace ncclep
