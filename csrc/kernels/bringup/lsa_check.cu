// LSA bring-up check: every rank stores a call-specific pattern into each LSA
// peer's window through ncclGetPeerPointer, an LSA barrier orders the stores,
// then every rank verifies the words its peers wrote into its own window.
//
// Area layout on every rank: lsaSize slots of wordsPerPeer uint64 words; slot s
// holds what LSA rank s wrote. Block b handles word indices i with
// (i / blockDim.x) % gridDim.x == b on every rank and uses LSA barrier b, so
// each barrier orders exactly the words its block wrote and later reads.
#include "kernels/bringup/lsa_check.h"

namespace ncclep {
namespace kernels {
namespace {

__device__ __forceinline__ uint64_t patternWord(uint32_t call, int src, int dst, uint32_t word) {
  return (uint64_t(call) << 32) | (uint64_t(src & 0x3ff) << 22) | (uint64_t(dst & 0x3ff) << 12) |
         uint64_t(word & 0xfff);
}

__global__ void __launch_bounds__(kLsaCheckThreads)
lsaCheckKernel(ncclDevComm devComm, ncclWindow_t window, size_t areaOffset, uint32_t wordsPerPeer,
               uint32_t call, LsaCheckResult* result) {
  const ncclTeam world = ncclTeamWorld(devComm);
  const ncclTeam lsa = ncclTeamLsa(devComm);
  const size_t slotBytes = size_t(wordsPerPeer) * sizeof(uint64_t);
  const uint32_t first = blockIdx.x * blockDim.x + threadIdx.x;
  const uint32_t step = gridDim.x * blockDim.x;

  ncclLsaBarrierSession<ncclCoopCta> bar{ncclCoopCta(), devComm, ncclTeamTagLsa(), blockIdx.x};

  // Entry barrier: a peer may still be verifying the previous call's words in
  // our slot of its window; nobody overwrites them before everyone is here.
  bar.sync(ncclCoopCta(), cuda::memory_order_acq_rel);

  for (int peer = 0; peer < world.nRanks; ++peer) {
    if (!ncclTeamRankIsMember(lsa, world, peer)) continue;  // off-node peers are GIN's job
    const int lsaPeer = ncclTeamRankToTeam(lsa, world, peer);
    uint64_t* dst = static_cast<uint64_t*>(
        ncclGetPeerPointer(window, areaOffset + size_t(lsa.rank) * slotBytes, world, peer));
    for (uint32_t i = first; i < wordsPerPeer; i += step) dst[i] = patternWord(call, lsa.rank, lsaPeer, i);
  }

  // Release orders our stores before our arrival at every peer; acquire makes
  // the peers' stores into our window visible before we read them.
  bar.sync(ncclCoopCta(), cuda::memory_order_acq_rel);

  const uint64_t* mine = static_cast<const uint64_t*>(ncclGetLocalPointer(window, areaOffset));
  unsigned long long bad = 0;
  for (int src = 0; src < lsa.nRanks; ++src) {
    for (uint32_t i = first; i < wordsPerPeer; i += step) {
      const uint64_t got = mine[size_t(src) * wordsPerPeer + i];
      const uint64_t expected = patternWord(call, src, lsa.rank, i);
      if (got != expected) {
        if (bad++ == 0 && atomicCAS(&result->claimed, 0, 1) == 0) {
          result->firstGot = got;
          result->firstExpected = expected;
          result->firstSender = src;
          result->firstWord = int(i);
        }
      }
    }
  }
  if (bad != 0) atomicAdd(&result->mismatches, bad);
}

}  // namespace

uint32_t lsaCheckWordsPerPeer(int lsaSize, size_t areaBytes) {
  if (lsaSize <= 0) return 0;
  size_t words = areaBytes / sizeof(uint64_t) / size_t(lsaSize);
  return uint32_t(words < kLsaCheckMaxWordsPerPeer ? words : kLsaCheckMaxWordsPerPeer);
}

cudaError_t launchLsaCheck(const ncclDevComm& devComm, ncclWindow_t window, size_t areaOffset,
                           size_t areaBytes, uint32_t call, LsaCheckResult* result,
                           cudaStream_t stream) {
  const uint32_t wordsPerPeer = lsaCheckWordsPerPeer(devComm.lsaSize, areaBytes);
  if (wordsPerPeer == 0 || devComm.lsaSize > kLsaCheckMaxLsaSize) return cudaErrorInvalidValue;
  lsaCheckKernel<<<kLsaCheckBlocks, kLsaCheckThreads, 0, stream>>>(devComm, window, areaOffset,
                                                                  wordsPerPeer, call, result);
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace ncclep
