// The calling thread's last-error message and the status-code names.
#include "core/last_error.h"

#include <cstdarg>
#include <cstdio>
#include <string>

namespace ncclep {
namespace {

thread_local std::string tLastError;

}  // namespace

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

void storeLastError(std::string msg) noexcept {
  try {
    tLastError = std::move(msg);
  } catch (...) {
    // Out of host memory while recording an error: keep the previous message.
  }
}

ncclepResult_t setError(ncclepResult_t code, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  try {
    storeLastError(vformat(fmt, args));
  } catch (...) {
  }
  va_end(args);
  return code;
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
