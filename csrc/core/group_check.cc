// Host side of ncclepGroupCheckLsa: launch the bring-up kernel and wait for it
// with a deadline (NCCL's LSA barrier has none of its own).
#include <chrono>
#include <thread>

#include "core/buffer_plan.h"
#include "core/errors.h"
#include "core/group.h"
#include "kernels/bringup/lsa_check.h"

namespace ncclep {
namespace {

// Polls `event` until it completes or `timeoutSeconds` pass.
ncclepResult_t waitEvent(cudaEvent_t event, double timeoutSeconds, bool* timedOut) {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(timeoutSeconds));
  auto sleep = std::chrono::microseconds(10);
  *timedOut = false;
  while (true) {
    cudaError_t e = cudaEventQuery(event);
    if (e == cudaSuccess) return ncclepSuccess;
    if (e != cudaErrorNotReady) return cudaFailure(e, "waiting for the LSA check kernel (cudaEventQuery)");
    if (Clock::now() >= deadline) {
      *timedOut = true;
      return ncclepSuccess;
    }
    std::this_thread::sleep_for(sleep);
    if (sleep < std::chrono::milliseconds(1)) sleep *= 2;
  }
}

ncclepResult_t checkLsa(ncclepGroup* g, cudaStream_t stream, int* ok) {
  if (g->broken)
    return setError(ncclepInvalidUsage, "ncclepGroupCheckLsa: the group timed out earlier and can only be destroyed");
  if (g->loopback)  // the check's barrier lives in the NCCL device communicator, which it has not
    return setError(ncclepUnsupported, "ncclepGroupCheckLsa: not available on a loopback group");
  if (!g->devCommCreated)
    return setError(ncclepUnsupported, "ncclepGroupCheckLsa: NCCL device API unavailable: %s",
                    g->deviceApiError.c_str());
  if (g->lsaSize > kernels::kLsaCheckMaxLsaSize)
    return setError(ncclepUnsupported, "ncclepGroupCheckLsa: LSA team of %d ranks exceeds the check's limit of %d",
                    g->lsaSize, kernels::kLsaCheckMaxLsaSize);

  DeviceGuard guard;
  NCCLEP_CHECK(guard.set(g->cudaDevice));

  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  NCCLEP_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture), "cudaStreamIsCapturing");
  if (capture != cudaStreamCaptureStatusNone)
    return setError(ncclepInvalidUsage, "ncclepGroupCheckLsa synchronises the host and cannot be captured in a CUDA graph");

  // The call index is part of every pattern word, so words left by an earlier
  // call (or never written) cannot pass. All ranks call in the same order.
  const uint32_t call = ++g->checkCalls;
  NCCLEP_CUDA_CHECK(cudaMemsetAsync(g->checkResult, 0, sizeof(*g->checkResult), stream),
                    "cudaMemsetAsync(LSA check result)");
  NCCLEP_CUDA_CHECK(kernels::launchLsaCheck(g->devComm, g->window, kBringupOffset, kBringupBytes, call,
                                            g->checkResult, stream),
                    "launching the LSA check kernel (lsaSize=%d)", g->lsaSize);
  NCCLEP_CUDA_CHECK(cudaEventRecord(g->checkDone, stream), "cudaEventRecord");

  bool timedOut = false;
  NCCLEP_CHECK(waitEvent(g->checkDone, g->config.timeoutSeconds, &timedOut));
  if (timedOut) {
    g->broken = true;
    return setError(ncclepTimeout,
                    "ncclepGroupCheckLsa (call %u) did not finish within %g s on rank %d: some LSA peer did not "
                    "reach the barrier (does every rank call ncclepGroupCheckLsa?); the group can only be destroyed",
                    call, g->config.timeoutSeconds, g->rank);
  }

  kernels::LsaCheckResult r{};
  NCCLEP_CUDA_CHECK(cudaMemcpyAsync(&r, g->checkResult, sizeof(r), cudaMemcpyDeviceToHost, stream),
                    "cudaMemcpyAsync(LSA check result)");
  NCCLEP_CUDA_CHECK(cudaStreamSynchronize(stream), "cudaStreamSynchronize");

  *ok = r.mismatches == 0 ? 1 : 0;
  if (r.mismatches != 0)
    setError(ncclepSuccess,
             "LSA check (call %u) failed on rank %d (LSA rank %d of %d): %llu mismatching words; first from LSA "
             "rank %d, word %d: got 0x%016llx, expected 0x%016llx",
             call, g->rank, g->lsaRank, g->lsaSize, r.mismatches, r.firstSender, r.firstWord, r.firstGot,
             r.firstExpected);
  return ncclepSuccess;
}

}  // namespace
}  // namespace ncclep

extern "C" ncclepResult_t ncclepGroupCheckLsa(ncclepGroup_t group, cudaStream_t stream, int* ok) {
  NCCLEP_API_TRY
  if (ok == nullptr) return ncclep::setError(ncclepInvalidArgument, "ncclepGroupCheckLsa: ok is NULL");
  *ok = 0;
  if (group == nullptr) return ncclep::setError(ncclepInvalidArgument, "ncclepGroupCheckLsa: group is NULL");
  return ncclep::checkLsa(group, stream, ok);
  NCCLEP_API_CATCH
}
