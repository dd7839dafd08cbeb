// LSA bring-up check kernel: host-callable launcher (compiled by nvcc in lsa_check.cu).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>
#include <nccl.h>
#include <nccl_device.h>

namespace ncclep {
namespace kernels {

// The kernel uses one LSA barrier per block: the device communicator must be
// created with lsaBarrierCount >= kLsaCheckBlocks.
constexpr int kLsaCheckBlocks = 4;
constexpr int kLsaCheckThreads = 256;
// Pattern words encode sender and receiver LSA ranks in 10 bits each.
constexpr int kLsaCheckMaxLsaSize = 1024;
constexpr uint32_t kLsaCheckMaxWordsPerPeer = 1024;

struct LsaCheckResult {
  unsigned long long mismatches;
  unsigned long long firstGot;
  unsigned long long firstExpected;
  int firstSender;  // LSA rank whose words did not match
  int firstWord;
  int claimed;      // set by the thread that recorded the first mismatch
  int pad;
};

// Words each sender writes to each peer for an LSA team of lsaSize ranks, so that
// lsaSize * wordsPerPeer * 8 <= areaBytes. Returns 0 if the area is too small.
uint32_t lsaCheckWordsPerPeer(int lsaSize, size_t areaBytes);

// Enqueues the check on `stream`. The area [areaOffset, areaOffset + areaBytes)
// of `window` must be reserved for it on every rank; `call` must be the same on
// all ranks and differ from the previous call's; `result` (device memory) must
// be zeroed beforehand. Returns the launch error, if any.
cudaError_t launchLsaCheck(const ncclDevComm& devComm, ncclWindow_t window, size_t areaOffset,
                           size_t areaBytes, uint32_t call, LsaCheckResult* result,
                           cudaStream_t stream);

}  // namespace kernels
}  // namespace ncclep
