// Reading and checking the top-k expert ids, the same rules for every kernel that routes tokens:
// an id is an expert in [0, numExperts), or -1 for none; any other id becomes -1, and so does a
// repeat of an earlier choice of the same token (the first stays). The kernel that reads a call's
// ids first reports what it dropped through the error word (kDeviceBadExpert with the id,
// kDeviceDuplicateExpert with the token); kernels that read them again drop the same ids silently.
#pragma once

#include <cstdint>

#include "common/device_error.cuh"

namespace ncclep {
namespace device {

// Entry i of a top-k tensor of int32 or int64 ids.
__device__ __forceinline__ int64_t loadExpertId(const void* idx, int idx64, int64_t i) {
  return idx64 ? static_cast<const int64_t*>(idx)[i] : int64_t(static_cast<const int32_t*>(idx)[i]);
}

// Stores entry i of a top-k tensor of int32 or int64 ids.
__device__ __forceinline__ void storeExpertId(void* idx, int idx64, int64_t i, int id) {
  if (idx64) static_cast<int64_t*>(idx)[i] = id;
  else static_cast<int32_t*>(idx)[i] = id;
}

__device__ __forceinline__ bool isExpertId(int64_t raw, int numExperts) { return raw >= -1 && raw < numExperts; }

// `raw` if it is in [-1, numExperts), else -1 (reported when `report`).
__device__ __forceinline__ int checkExpertId(int64_t raw, int numExperts, bool report, const ErrorSink& err,
                                             int phase) {
  if (isExpertId(raw, numExperts)) return int(raw);
  if (report) reportError(err, kDeviceBadExpert, phase, -1, int32_t(raw));
  return -1;
}

// The id of a repeated choice of `token`: -1 (reported when `report`).
__device__ __forceinline__ int dropRepeat(int token, bool report, const ErrorSink& err, int phase) {
  if (report) reportError(err, kDeviceDuplicateExpert, phase, -1, token);
  return -1;
}

// A warp per token, lane k < topk holding choice k's raw id (the other lanes' `raw` is ignored):
// the checked expert of that choice, -1 elsewhere. Every lane must call it (warp shuffles).
// Silent: for kernels whose ids another step reports.
__device__ __forceinline__ int warpCheckedChoice(int64_t raw, int topk, int numExperts, int lane) {
  const int e = lane < topk && isExpertId(raw, numExperts) ? int(raw) : -1;
  bool repeat = false;
  for (int j = 0; j < topk; ++j) {
    const int other = __shfl_sync(0xffffffffu, e, j);
    repeat |= j < lane && e >= 0 && other == e;
  }
  return repeat ? -1 : e;
}

// The same for token b, its ids loaded here.
__device__ __forceinline__ int warpTokenExpert(const void* idx, int idx64, int b, int topk, int numExperts,
                                               int lane) {
  const int64_t raw = lane < topk ? loadExpertId(idx, idx64, int64_t(b) * topk + lane) : -1;
  return warpCheckedChoice(raw, topk, numExperts, lane);
}

// A lane per token: experts[k] = the checked expert of choice k < topk of token b (KM >= topk),
// -1 for k >= topk or when the lane holds no token (`valid` false); reports what it drops.
template <int KM>
__device__ __forceinline__ void laneTokenExperts(const void* idx, int idx64, int b, bool valid, int topk,
                                                 int numExperts, int (&experts)[KM], const ErrorSink& err,
                                                 int phase) {
  int64_t raw[KM];
#pragma unroll
  for (int k = 0; k < KM; ++k) raw[k] = (valid && k < topk) ? loadExpertId(idx, idx64, int64_t(b) * topk + k) : -1;
#pragma unroll
  for (int k = 0; k < KM; ++k) {
    int e = checkExpertId(raw[k], numExperts, true, err, phase);
    bool repeat = false;
#pragma unroll
    for (int j = 0; j < k; ++j) repeat |= e >= 0 && experts[j] == e;
    if (repeat) e = dropRepeat(b, true, err, phase);
    experts[k] = e;
  }
}

}  // namespace device
}  // namespace ncclep
