// What the kernels can serve, decided in one place: the launchers refuse with it, the bindings
// report it. Host-only (no CUDA or NCCL header), so it is built and tested on machines without them.
#pragma once

#include <string>

#include "ncclep.h"

namespace ncclep {

// "" when the kernels of config.mode serve a group of this config on this topology, else the reason.
std::string kernelSupportGap(const ncclepGroupConfig_t& config, const ncclepTopology_t& topology);

// Worst-case rows of an HT dispatch output; the arguments are checked by the caller.
long long htNumRows(const ncclepGroupConfig_t& config, int nRanks, int topk, int layout, int alignment);

// SMs of the HT kernels: the config's numSms, else the HT default, never more than the device's,
// never fewer than one block per role.
int htKernelSms(int configSms, int deviceSms, bool hierarchical);

// Copies `text` into a caller's buffer of `bytes` (NUL-terminated, truncated; nothing when 0).
void copyReason(const std::string& text, char* out, size_t bytes);

}  // namespace ncclep
