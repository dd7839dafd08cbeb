// Failed CUDA and NCCL calls as ncclep status codes with a last-error message.
#include "core/errors.h"

#include <cctype>
#include <cstdarg>
#include <cstdio>
#include <string>

namespace ncclep {
namespace {

bool mentionsOutOfMemory(const char* s) {
  if (s == nullptr) return false;
  std::string lower(s);
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return lower.find("out of memory") != std::string::npos;
}

}  // namespace

ncclepResult_t cudaFailure(cudaError_t err, const char* whatFmt, ...) {
  va_list args;
  va_start(args, whatFmt);
  try {
    std::string what = vformat(whatFmt, args);
    char tail[512];
    std::snprintf(tail, sizeof(tail), " failed: %s: %s", cudaGetErrorName(err), cudaGetErrorString(err));
    storeLastError(what + tail);
  } catch (...) {
  }
  va_end(args);
  return err == cudaErrorMemoryAllocation ? ncclepOutOfMemory : ncclepCudaError;
}

ncclepResult_t ncclFailure(ncclResult_t res, ncclComm_t comm, const char* whatFmt, ...) {
  va_list args;
  va_start(args, whatFmt);
  // ncclGetLastError holds NCCL's own detailed message (thread-local in NCCL).
  const char* detail = ncclGetLastError(comm);
  bool oom = mentionsOutOfMemory(detail);
  try {
    std::string msg = vformat(whatFmt, args);
    msg += " failed: ";
    msg += ncclGetErrorString(res);
    if (detail != nullptr && detail[0] != '\0') {
      msg += " [";
      msg += detail;
      msg += "]";
    }
    if (oom) msg += " (out of memory)";
    storeLastError(std::move(msg));
  } catch (...) {
  }
  va_end(args);
  return oom ? ncclepOutOfMemory : ncclepNcclError;
}

}  // namespace ncclep
