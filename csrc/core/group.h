// The group object behind ncclepGroup_t (internal; not part of the C API).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>
#include <nccl.h>
#include <nccl_device.h>

#include "common/device_error.h"
#include "core/buffer_plan.h"
#include "kernels/bringup/lsa_check.h"
#include "ncclep.h"

namespace ncclep {
struct LoopbackWindows;  // core/loopback.cc
}

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
  // Set on the groups of ncclepLoopbackCreate (every rank on one device, no NCCL); shared by them.
  std::shared_ptr<ncclep::LoopbackWindows> loopback;

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

// The windows of a loopback set (ncclepLoopbackCreate): every rank's at base + rank * stride, as
// NCCL lays out an LSA team's, so that the kernels' ncclGetLsaPointer finds them.
struct LoopbackWindows {
  bool leak = false;  // a kernel may still run: keep the memory
  ~LoopbackWindows();
  uintptr_t base = 0;
  size_t stride = 0;
  size_t reserved = 0;
  size_t mapped = 0;  // bytes mapped at each rank's window
  std::vector<unsigned long long> handles;  // CUmemGenericAllocationHandle per rank; 0 until made
  std::vector<unsigned char> mappedAt;      // 1 where a rank's window is mapped
  void* deviceWindows = nullptr;            // ncclWindow_vidmem[nRanks] in device memory
};

// Group creation's steps, shared by ncclepGroupCreate and ncclepLoopbackCreate.
ncclepResult_t checkCreateArgs(ncclepGroup_t* out, int nRanks, int rank, int cudaDevice,
                               const ncclepGroupConfig_t* config, size_t* windowBytes, BufferPlan* planOut);
// A group object with checkCreateArgs' results, nothing created yet.
std::unique_ptr<ncclepGroup> newGroup(int rank, int nRanks, int cudaDevice, const ncclepGroupConfig_t& config,
                                      size_t windowBytes, const BufferPlan& plan);
// The device's SMs and the virtual nodes (config or NCCLEP_VIRTUAL_NODES); allocates nothing.
ncclepResult_t resolveDeviceShape(ncclepGroup* g);
// What the group needs on its device before any peer is involved: resolveDeviceShape, then the
// LSA check's result and the error word.
ncclepResult_t createLocalResources(ncclepGroup* g);
// Teardown in reverse order of creation; collective unless `graceful` is false (creation failed
// part-way: the comm is aborted).
ncclepResult_t destroyGroup(ncclepGroup* g, bool graceful);

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
