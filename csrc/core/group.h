// The group object behind ncclepGroup_t (internal; not part of the C API).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>
#include <nccl.h>
#include <nccl_device.h>

#include "common/device_error.h"
#include "core/buffer_plan.h"
#include "kernels/bringup/lsa_check.h"
#include "ncclep.h"

struct ncclepGroup {
  int rank = -1;
  int nRanks = 0;
  int cudaDevice = -1;
  ncclepGroupConfig_t config{};

  ncclComm_t comm = nullptr;
  void* windowPtr = nullptr;  // ncclMemAlloc'd, windowBytes long
  size_t windowBytes = 0;
  ncclWindow_t window = nullptr;
  ncclDevComm devComm{};
  bool devCommCreated = false;

  int lsaRank = -1;
  int lsaSize = 0;
  int nLsaTeams = 0;
  bool ginEnabled = false;
  std::string deviceApiError;  // why devCommCreated is false

  ncclep::kernels::LsaCheckResult* checkResult = nullptr;  // device memory
  cudaEvent_t checkDone = nullptr;
  uint32_t checkCalls = 0;

  ncclep::BufferPlan plan{};
  int deviceSms = 0;  // multiprocessors of cudaDevice
  int virtualNodes = 1;  // NCCLEP_VIRTUAL_NODES: one NVLink host split into this many nodes
  int nodeSize = 0;      // ranks per (virtual) node; 0 until the device API is up
  // The error word: pinned host memory the kernels write through its device mapping.
  ncclep::DeviceError* errorHost = nullptr;
  ncclep::DeviceError* errorDevice = nullptr;

  // A kernel of this group may still be running (a wait timed out): the
  // collective teardown and the window free are skipped, the comm is aborted.
  bool broken = false;
  // groupKernelGap() is fixed once the group exists; every launch checks it, so it is kept.
  bool kernelGapKnown = false;
  std::string kernelGap;
};

namespace ncclep {

// Makes `device` current for the scope and restores the previous device.
class DeviceGuard {
 public:
  DeviceGuard() = default;
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  ~DeviceGuard();
  ncclepResult_t set(int device);

 private:
  int previous_ = -1;
  int current_ = -1;
};

}  // namespace ncclep
