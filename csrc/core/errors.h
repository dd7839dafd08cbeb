// Failed CUDA/NCCL calls as status codes (the last-error message: last_error.h), and checked-call macros.
#pragma once

#include <exception>
#include <new>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include "core/last_error.h"
#include "ncclep.h"

namespace ncclep {

// Maps a failed CUDA call to a status (cudaErrorMemoryAllocation -> OutOfMemory)
// and records "<what> failed: <cuda error name>: <description>".
ncclepResult_t cudaFailure(cudaError_t err, const char* whatFmt, ...)
    __attribute__((format(printf, 2, 3)));

// Maps a failed NCCL call to a status (out-of-memory messages -> OutOfMemory)
// and records "<what> failed: <nccl error string> [<ncclGetLastError>]".
ncclepResult_t ncclFailure(ncclResult_t res, ncclComm_t comm, const char* whatFmt, ...)
    __attribute__((format(printf, 3, 4)));

}  // namespace ncclep

// NCCLEP_CUDA_CHECK(cudaMalloc(&p, n), "cudaMalloc(%zu)", n)
#define NCCLEP_CUDA_CHECK(call, ...)                                           \
  do {                                                                         \
    cudaError_t ncclepErr_ = (call);                                           \
    if (ncclepErr_ != cudaSuccess) return ::ncclep::cudaFailure(ncclepErr_, __VA_ARGS__); \
  } while (0)

// NCCLEP_NCCL_CHECK(ncclMemAlloc(&p, n), comm, "ncclMemAlloc(%zu)", n)
#define NCCLEP_NCCL_CHECK(call, comm, ...)                                     \
  do {                                                                         \
    ncclResult_t ncclepNres_ = (call);                                         \
    if (ncclepNres_ != ncclSuccess) return ::ncclep::ncclFailure(ncclepNres_, (comm), __VA_ARGS__); \
  } while (0)

// Wraps the body of every extern "C" entry point: no exception crosses the C boundary.
#define NCCLEP_API_TRY try {
#define NCCLEP_API_CATCH                                                                      \
  }                                                                                           \
  catch (const std::bad_alloc&) {                                                             \
    return ::ncclep::setError(ncclepOutOfMemory, "%s: host memory allocation failed", __func__); \
  }                                                                                           \
  catch (const std::exception& e) {                                                           \
    return ::ncclep::setError(ncclepInternalError, "%s: unexpected exception: %s", __func__, e.what()); \
  }                                                                                           \
  catch (...) {                                                                               \
    return ::ncclep::setError(ncclepInternalError, "%s: unexpected unknown exception", __func__); \
  }
