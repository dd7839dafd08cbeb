#include "core/errors.h"

#include <cctype>
#include <cstdarg>
#include <cstdio>
#include <new>
#include <string>

namespace ncclep {
namespace {

thread_local std::string tLastError;

std::string vformat(const char* fmt, va_list args) {
  char buf[1024];
  va_list copy;
  va_copy(copy, args);
  int n = std::vsnprintf(buf, sizeof(buf), fmt, copy);
  va_end(copy);
  if (n < 0) return std::string("(unformattable error message)");
  if (static_cast<size_t>(n) < sizeof(buf)) return std::string(buf, static_cast<size_t>(n));
  std::string out(static_cast<size_t>(n) + 1, '\0');
  std::vsnprintf(&out[0], out.size(), fmt, args);
  out.resize(static_cast<size_t>(n));
  return out;
}

void store(std::string msg) noexcept {
  try {
    tLastError = std::move(msg);
  } catch (...) {
    // Out of host memory while recording an error: keep the previous message.
  }
}

bool mentionsOutOfMemory(const char* s) {
  if (s == nullptr) return false;
  std::string lower(s);
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return lower.find("out of memory") != std::string::npos;
}

}  // namespace

ncclepResult_t setError(ncclepResult_t code, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  try {
    store(vformat(fmt, args));
  } catch (...) {
  }
  va_end(args);
  return code;
}

ncclepResult_t cudaFailure(cudaError_t err, const char* whatFmt, ...) {
  va_list args;
  va_start(args, whatFmt);
  try {
    std::string what = vformat(whatFmt, args);
    char tail[512];
    std::snprintf(tail, sizeof(tail), " failed: %s: %s", cudaGetErrorName(err), cudaGetErrorString(err));
    store(what + tail);
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
    store(std::move(msg));
  } catch (...) {
  }
  va_end(args);
  return oom ? ncclepOutOfMemory : ncclepNcclError;
}

}  // namespace ncclep

extern "C" const char* ncclepGetErrorString(ncclepResult_t result) {
  switch (result) {
    case ncclepSuccess: return "ncclepSuccess: no error";
    case ncclepInvalidArgument: return "ncclepInvalidArgument: invalid argument";
    case ncclepCudaError: return "ncclepCudaError: a CUDA call failed";
    case ncclepNcclError: return "ncclepNcclError: an NCCL call failed";
    case ncclepInternalError: return "ncclepInternalError: internal error";
    case ncclepUnsupported: return "ncclepUnsupported: not supported here";
    case ncclepTimeout: return "ncclepTimeout: a wait timed out";
    case ncclepOutOfMemory: return "ncclepOutOfMemory: out of memory";
    case ncclepInvalidUsage: return "ncclepInvalidUsage: call not allowed in this state";
    case ncclepDeviceError: return "ncclepDeviceError: a kernel reported an error";
    default: return "ncclep: unknown status code";
  }
}

extern "C" const char* ncclepGetLastError(void) { return ncclep::tLastError.c_str(); }
