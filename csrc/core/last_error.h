// The calling thread's last-error message (ncclepGetLastError). Needs no CUDA or NCCL header, so
// host-only parts of the core (kernel_facts.cc) build and test without them.
#pragma once

#include <cstdarg>
#include <string>

#include "ncclep.h"

namespace ncclep {

// Sets the calling thread's last-error message and returns `code`.
ncclepResult_t setError(ncclepResult_t code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

std::string vformat(const char* fmt, va_list args);
void storeLastError(std::string msg) noexcept;

}  // namespace ncclep

#define NCCLEP_CHECK(call)                                  \
  do {                                                      \
    ncclepResult_t ncclepRes_ = (call);                     \
    if (ncclepRes_ != ncclepSuccess) return ncclepRes_;     \
  } while (0)
