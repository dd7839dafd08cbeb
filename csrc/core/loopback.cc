// ncclepLoopbackCreate: every rank of a group on one device, without NCCL. Each rank's window is
// mapped at base + rank * stride of one address range, and its ncclWindow_t is a description of
// that range laid out as NCCL's, so the kernels reach their "peers" through ncclGetLsaPointer
// unchanged. The virtual-memory calls come from the driver's entry points (no -lcuda).
#include <cuda.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "core/errors.h"
#include "core/group.h"
#include "core/ops_common.h"

namespace ncclep {
namespace {

struct Driver {
  decltype(&::cuMemGetAllocationGranularity) granularity = nullptr;
  decltype(&::cuMemCreate) create = nullptr;
  decltype(&::cuMemRelease) release = nullptr;
  decltype(&::cuMemAddressReserve) reserve = nullptr;
  decltype(&::cuMemAddressFree) unreserve = nullptr;
  decltype(&::cuMemMap) map = nullptr;
  decltype(&::cuMemUnmap) unmap = nullptr;
  decltype(&::cuMemSetAccess) setAccess = nullptr;
  bool ok = false;
};

template <typename Fn>
bool entry(const char* name, Fn* fn) {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult q;
  if (cudaGetDriverEntryPointByVersion(name, &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
      q != cudaDriverEntryPointSuccess)
    return false;
  *fn = reinterpret_cast<Fn>(p);
  return true;
}

const Driver& driver() {
  static const Driver d = [] {
    Driver v;
    v.ok = entry("cuMemGetAllocationGranularity", &v.granularity) && entry("cuMemCreate", &v.create) &&
           entry("cuMemRelease", &v.release) && entry("cuMemAddressReserve", &v.reserve) &&
           entry("cuMemAddressFree", &v.unreserve) && entry("cuMemMap", &v.map) && entry("cuMemUnmap", &v.unmap) &&
           entry("cuMemSetAccess", &v.setAccess);
    return v;
  }();
  return d;
}

#define LOOPBACK_CU_CHECK(call, what)                                                            \
  do {                                                                                          \
    const CUresult r_ = (call);                                                                 \
    if (r_ != CUDA_SUCCESS) return setError(ncclepCudaError, "ncclepLoopbackCreate: %s failed (CUresult %d)", \
                                            what, int(r_));                                     \
  } while (0)

constexpr size_t k4G = size_t(1) << 32;

// Maps nRanks windows of `bytes` each at a stride of a multiple of 4 GiB (ncclWindow_vidmem keeps
// the stride in 4 GiB units) and writes each rank's window description to device memory.
ncclepResult_t mapWindows(LoopbackWindows* w, int nRanks, int device, size_t bytes) {
  const Driver& d = driver();
  if (!d.ok) return setError(ncclepCudaError, "ncclepLoopbackCreate: the driver's virtual memory calls are unavailable");
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  size_t grain = 0;
  LOOPBACK_CU_CHECK(d.granularity(&grain, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED), "cuMemGetAllocationGranularity");
  w->mapped = (bytes + grain - 1) / grain * grain;
  w->stride = (w->mapped + k4G - 1) / k4G * k4G;
  CUdeviceptr base = 0;
  LOOPBACK_CU_CHECK(d.reserve(&base, w->stride * size_t(nRanks), k4G, 0, 0), "cuMemAddressReserve");
  w->base = uintptr_t(base);
  w->reserved = w->stride * size_t(nRanks);
  w->handles.assign(size_t(nRanks), 0);
  w->mappedAt.assign(size_t(nRanks), 0);
  CUmemAccessDesc access{};
  access.location = prop.location;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  for (int r = 0; r < nRanks; ++r) {
    CUmemGenericAllocationHandle h = 0;
    LOOPBACK_CU_CHECK(d.create(&h, w->mapped, &prop, 0), "cuMemCreate");
    w->handles[size_t(r)] = h;
    LOOPBACK_CU_CHECK(d.map(base + r * w->stride, w->mapped, 0, h, 0), "cuMemMap");
    w->mappedAt[size_t(r)] = 1;
    LOOPBACK_CU_CHECK(d.setAccess(base + r * w->stride, w->mapped, &access, 1), "cuMemSetAccess");
  }
  for (int r = 0; r < nRanks; ++r)  // as ncclepGroupCreate: no stale word may survive
    NCCLEP_CUDA_CHECK(cudaMemset(reinterpret_cast<void*>(w->base + r * w->stride), 0, w->mapped),
                      "cudaMemset(loopback window %d)", r);
  std::vector<ncclWindow_vidmem> desc(static_cast<size_t>(nRanks));
  std::memset(static_cast<void*>(desc.data()), 0, desc.size() * sizeof(desc[0]));
  for (int r = 0; r < nRanks; ++r) {
    desc[size_t(r)].lsaFlatBase = reinterpret_cast<char*>(w->base);
    desc[size_t(r)].lsaRank = r;
    desc[size_t(r)].worldRank = r;
    desc[size_t(r)].stride4G = uint32_t(w->stride / k4G);
  }
  NCCLEP_CUDA_CHECK(cudaMalloc(&w->deviceWindows, desc.size() * sizeof(desc[0])), "cudaMalloc(loopback windows)");
  NCCLEP_CUDA_CHECK(cudaMemcpy(w->deviceWindows, desc.data(), desc.size() * sizeof(desc[0]), cudaMemcpyHostToDevice),
                    "cudaMemcpy(loopback windows)");
  NCCLEP_CUDA_CHECK(cudaDeviceSynchronize(), "cudaDeviceSynchronize after zeroing the windows");
  return ncclepSuccess;
}

}  // namespace

LoopbackWindows::~LoopbackWindows() {
  if (leak) return;
  const Driver& d = driver();
  cudaDeviceSynchronize();
  if (deviceWindows != nullptr) cudaFree(deviceWindows);
  for (size_t r = 0; r < handles.size(); ++r) {
    if (mappedAt[r]) d.unmap(CUdeviceptr(base + r * stride), mapped);
    if (handles[r] != 0) d.release(handles[r]);
  }
  if (reserved != 0) d.unreserve(CUdeviceptr(base), reserved);
}

}  // namespace ncclep

using ncclep::setError;

namespace {

// Tears down the groups made so far unless released: ncclepLoopbackCreate's every early return
// and exception. Keeps the failure's message (teardown may set its own).
struct PartialGroups {
  std::vector<std::unique_ptr<ncclepGroup>> groups;
  ~PartialGroups() {
    if (groups.empty()) return;
    std::string text = ncclepGetLastError();
    for (auto& g : groups) ncclep::destroyGroup(g.get(), /*graceful=*/false);
    ncclep::storeLastError(std::move(text));
  }
};

}  // namespace

extern "C" ncclepResult_t ncclepLoopbackCreate(ncclepGroup_t* groups, int nRanks, int cudaDevice,
                                               const ncclepGroupConfig_t* config) {
  NCCLEP_API_TRY
  if (groups == nullptr) return setError(ncclepInvalidArgument, "ncclepLoopbackCreate: groups is NULL");
  if (nRanks < 1) return setError(ncclepInvalidArgument, "ncclepLoopbackCreate: nRanks = %d: must be >= 1", nRanks);
  for (int r = 0; r < nRanks; ++r) groups[r] = nullptr;
  size_t windowBytes = 0;
  ncclep::BufferPlan plan;
  NCCLEP_CHECK(ncclep::checkCreateArgs(groups, nRanks, 0, cudaDevice, config, &windowBytes, &plan));
  ncclep::DeviceGuard guard;
  NCCLEP_CHECK(guard.set(cudaDevice));

  PartialGroups made;
  made.groups.reserve(size_t(nRanks));
  for (int r = 0; r < nRanks; ++r) {
    made.groups.push_back(ncclep::newGroup(r, nRanks, cudaDevice, *config, windowBytes, plan));
    ncclepGroup* g = made.groups.back().get();
    g->lsaRank = r;
    g->lsaSize = nRanks;
    g->nLsaTeams = 1;
  }
  // What every rank shares, checked before any memory is taken.
  ncclepGroup* first = made.groups.front().get();
  NCCLEP_CHECK(ncclep::resolveDeviceShape(first));
  if (nRanks % first->virtualNodes != 0)
    return setError(ncclepInvalidArgument, "ncclepLoopbackCreate: %d virtual nodes do not divide %d ranks",
                    first->virtualNodes, nRanks);
  first->nodeSize = nRanks / first->virtualNodes;
  const int sms = ncclep::groupKernelSms(first);
  if (nRanks * sms > first->deviceSms)
    return setError(ncclepInvalidArgument,
                    "ncclepLoopbackCreate: %d ranks' kernels of %d SMs each do not fit on the device's %d SMs at "
                    "once (fewer ranks, or numSms <= %d where the mode allows so few)",
                    nRanks, sms, first->deviceSms, first->deviceSms / nRanks);

  auto windows = std::make_shared<ncclep::LoopbackWindows>();
  NCCLEP_CHECK(ncclep::mapWindows(windows.get(), nRanks, cudaDevice, windowBytes));
  for (int r = 0; r < nRanks; ++r) {
    ncclepGroup* g = made.groups[size_t(r)].get();
    g->loopback = windows;
    g->windowPtr = reinterpret_cast<void*>(windows->base + r * windows->stride);
    g->window = static_cast<ncclWindow_vidmem*>(windows->deviceWindows) + r;
    NCCLEP_CHECK(ncclep::createLocalResources(g));
    g->nodeSize = nRanks / g->virtualNodes;
    g->devCommCreated = true;  // the kernels' one use of it, ncclGetLsaPointer, reads g->window
  }
  for (int r = 0; r < nRanks; ++r) groups[r] = made.groups[size_t(r)].release();
  made.groups.clear();
  return ncclepSuccess;
  NCCLEP_API_CATCH
}
