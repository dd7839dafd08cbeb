// Group lifecycle: NCCL communicator, symmetric window, device communicator.
#include "core/group.h"
#include "core/ops_common.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "core/buffer_plan.h"
#include "core/config.h"
#include "core/errors.h"
#include "core/nccl_compat.h"
#include "kernels/ht/ht_layout.h"
#include "kernels/ll/ll_layout.h"

namespace ncclep {

namespace {

// Since CUDA 12, cudaSetDevice creates the device's primary context: restoring
// a previous device that was never used would put a stray context on it (e.g.
// on GPU 0 in every rank's process). cuDevicePrimaryCtxGetState tells.
bool primaryContextActive(int device) {
  using GetState = int (*)(int device, unsigned int* flags, int* active);  // CUresult, CUdevice
  static GetState fn = []() -> GetState {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion("cuDevicePrimaryCtxGetState", &p, 12000, cudaEnableDefault, &q) !=
            cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      return nullptr;
    return reinterpret_cast<GetState>(p);
  }();
  if (fn == nullptr) return true;
  unsigned int flags = 0;
  int active = 0;
  if (fn(device, &flags, &active) != 0) return true;
  return active != 0;
}

}  // namespace

DeviceGuard::~DeviceGuard() {
  if (previous_ >= 0 && previous_ != current_ && primaryContextActive(previous_)) cudaSetDevice(previous_);
}

ncclepResult_t DeviceGuard::set(int device) {
  if (previous_ < 0) {
    int prev = -1;
    // Fails only without any usable device; then there is nothing to restore.
    if (cudaGetDevice(&prev) == cudaSuccess) previous_ = prev;
  }
  NCCLEP_CUDA_CHECK(cudaSetDevice(device), "cudaSetDevice(%d)", device);
  current_ = device;
  return ncclepSuccess;
}

static_assert(sizeof(ncclepUniqueId) == sizeof(ncclUniqueId), "ncclepUniqueId must wrap ncclUniqueId");

ncclepResult_t checkCreateArgs(ncclepGroup_t* out, int nRanks, int rank, int cudaDevice,
                               const ncclepGroupConfig_t* config, size_t* windowBytes, BufferPlan* planOut) {
  if (out == nullptr) return setError(ncclepInvalidArgument, "ncclepGroupCreate: group is NULL");
  if (nRanks < 1) return setError(ncclepInvalidArgument, "ncclepGroupCreate: nRanks = %d: must be >= 1", nRanks);
  if (rank < 0 || rank >= nRanks)
    return setError(ncclepInvalidArgument, "ncclepGroupCreate: rank = %d: must be in [0, nRanks=%d)", rank, nRanks);
  if (cudaDevice < 0)
    return setError(ncclepInvalidArgument, "ncclepGroupCreate: cudaDevice = %d: must be >= 0", cudaDevice);
  NCCLEP_CHECK(validateConfig(config, nRanks));

  // The HT hierarchical regions are planned for the virtual nodes of the config, else of
  // NCCLEP_VIRTUAL_NODES (checked again, with an error, when the group is created).
  int nodes = plannedNodes(*config, nRanks);
  if (nodes == 1 && config->virtualNodes <= 1) {
    if (const char* v = std::getenv("NCCLEP_VIRTUAL_NODES")) {
      char* end = nullptr;
      const long n = std::strtol(v, &end, 10);
      if (end != v && *end == '\0' && n > 1 && n <= nRanks && nRanks % n == 0) nodes = int(n);
    }
  }
  BufferPlan plan;
  NCCLEP_CHECK(planBuffers(*config, nRanks, nodes, &plan));
  *planOut = plan;
  if (config->windowBytes == 0) {
    *windowBytes = plan.totalBytes;
  } else {
    if (config->windowBytes < plan.totalBytes)
      return setError(ncclepInvalidArgument,
                      "invalid ncclepGroupConfig_t.windowBytes = %zu: smaller than the buffer plan's %zu bytes",
                      config->windowBytes, plan.totalBytes);
    if (config->windowBytes > SIZE_MAX - kWindowGranularity)
      return setError(ncclepInvalidArgument, "invalid ncclepGroupConfig_t.windowBytes = %zu: too large",
                      config->windowBytes);
    *windowBytes = (config->windowBytes + kWindowGranularity - 1) / kWindowGranularity * kWindowGranularity;
  }

  int count = 0;
  NCCLEP_CUDA_CHECK(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (cudaDevice >= count)
    return setError(ncclepInvalidArgument, "ncclepGroupCreate: cudaDevice = %d but only %d CUDA device(s) are visible",
                    cudaDevice, count);
  return ncclepSuccess;
}

namespace {

// Whether the loaded NCCL (version code `runtime`) can run kernels compiled against our headers;
// `needsGin`: the group spans several LSA teams. The rule, from NCCL's source (dev_runtime.cc,
// src/devcomm/) and its "Cross-Version Compatibility" notes:
//  - never a library older than the headers: NCCL itself refuses one from 2.29 on, and the
//    kernels' inlined device code may rely on what only the newer library sets up;
//  - 2.28 headers: ncclDevCommRequirements and ncclDevComm are unversioned and a 2.29+ library
//    refuses them, so only a later 2.28 patch (2.28.7 and 2.28.9 lay the structs out alike);
//  - 2.29+ headers: the requirements tell the library which release the kernels were built
//    against, and a newer library converts ncclDevComm for them, for LSA only: NCCL documents
//    GIN kernels as needing a rebuild for a new minor release. So a newer minor release runs a
//    group on one NVLink team, and a group that needs GIN only the same major.minor.
//    ncclDevCommCreate checks again (its compatibility table): its refusal is reported as well.
bool ncclRuntimeRunsOurKernels(int runtime, bool needsGin, std::string* why) {
  const compat::Version built = compat::decodeVersion(NCCL_VERSION_CODE);
  const compat::Version loaded = compat::decodeVersion(runtime);
  const bool sameMinor = loaded.major == built.major && loaded.minor == built.minor;
  const char* reason = nullptr;
  if (runtime < NCCL_VERSION_CODE) {
    reason = "a library older than the headers cannot run the kernels";
  } else if (!compat::kDeviceCodeVersioned && !sameMinor) {
    reason = "the device structs of NCCL 2.28 carry no version, and later libraries refuse them";
  } else if (needsGin && !sameMinor) {
    reason = "kernels that use GIN (this group spans several NVLink teams) run only on the NCCL minor "
             "release they were built against";
  }
  if (reason == nullptr) return true;
  char buf[640];
  std::snprintf(buf, sizeof(buf),
                "ncclep was built against NCCL %d.%d.%d headers but NCCL %d.%d.%d is loaded: %s. Rebuild ncclep "
                "against the loaded NCCL: `pip install -e . --no-build-isolation` (it uses the NCCL torch loads, "
                "or NCCL_HOME), or `make -C examples/c_api NCCL_HOME=...` for the C library; NCCL_HOME may be the "
                "nvidia/nccl folder of the nvidia-nccl-cu13==%d.%d.%d wheel",
                built.major, built.minor, built.patch, loaded.major, loaded.minor, loaded.patch, reason,
                loaded.major, loaded.minor, loaded.patch);
  *why = buf;
  return false;
}

// Creates the device communicator. Its failure is not an error of the group:
// the group reports deviceApiAvailable = 0 and keeps the reason.
void createDeviceComm(ncclepGroup* g) {
  int runtime = 0;
  if (ncclGetVersion(&runtime) != ncclSuccess) {
    g->deviceApiError = "ncclGetVersion failed";
    return;
  }
  std::string why;  // checked before the first device-API call
  if (!ncclRuntimeRunsOurKernels(runtime, /*needsGin=*/false, &why)) {
    g->deviceApiError = why;
    return;
  }
  // NCCL's device runtime is initialised by now (window registration); if it is
  // unusable, ncclTeamLsa returns an empty team instead of an error.
  ncclTeam_t lsa = ncclTeamLsa(g->comm);
  if (lsa.nRanks <= 0 || g->nRanks % lsa.nRanks != 0 || lsa.rank < 0 || lsa.rank >= lsa.nRanks) {
    char buf[256];
    std::snprintf(buf, sizeof(buf), "ncclTeamLsa returned an unusable team (nRanks=%d, rank=%d) for a %d-rank comm",
                  lsa.nRanks, lsa.rank, g->nRanks);
    g->deviceApiError = buf;
    return;
  }
  g->lsaSize = lsa.nRanks;
  g->lsaRank = lsa.rank;
  g->nLsaTeams = g->nRanks / lsa.nRanks;
  if (g->nLsaTeams == 1 && g->lsaSize % g->virtualNodes != 0) {
    char buf[256];
    std::snprintf(buf, sizeof(buf), "NCCLEP_VIRTUAL_NODES=%d does not divide the %d ranks of the NVLink team",
                  g->virtualNodes, g->lsaSize);
    g->deviceApiError = buf;
    return;
  }

  // Again now that the teams are known: GIN kernels need the NCCL minor release they were built for.
  if (!ncclRuntimeRunsOurKernels(runtime, /*needsGin=*/g->nLsaTeams > 1, &why)) {
    g->deviceApiError = why;
    return;
  }

  ncclDevCommRequirements reqs = compat::devCommRequirements();
  reqs.lsaBarrierCount = kernels::kLsaCheckBlocks;
  // GIN only when some peer is off our LSA team: asking for it on a NIC-less
  // host makes ncclDevCommCreate fail altogether.
  if (g->nLsaTeams > 1) {
    compat::requestGinToEveryPeer(&reqs);
    reqs.railGinBarrierCount = kernels::kLsaCheckBlocks;
    // LL and HT (hierarchical path) index their signals as kind * nRanks + peer.
    reqs.ginSignalCount = std::max(int(kLLSignalKinds), int(kHTSignalKinds)) * g->nRanks;
  }
  ncclResult_t res = ncclDevCommCreate(g->comm, &reqs, &g->devComm);
  if (res != ncclSuccess) {
    ncclFailure(res, g->comm, "ncclDevCommCreate(lsaBarrierCount=%d, gin=%s, nLsaTeams=%d)",
                reqs.lsaBarrierCount, g->nLsaTeams > 1 ? "requested" : "not requested", g->nLsaTeams);
    g->deviceApiError = ncclepGetLastError();
    std::memset(&g->devComm, 0, sizeof(g->devComm));
    return;
  }
  if (g->devComm.lsaSize != g->lsaSize || g->devComm.lsaRank != g->lsaRank) {
    char buf[256];
    std::snprintf(buf, sizeof(buf),
                  "device comm LSA team (size %d, rank %d) differs from ncclTeamLsa (size %d, rank %d)",
                  g->devComm.lsaSize, g->devComm.lsaRank, g->lsaSize, g->lsaRank);
    g->deviceApiError = buf;
    ncclDevCommDestroy(g->comm, &g->devComm);
    std::memset(&g->devComm, 0, sizeof(g->devComm));
    return;
  }
  g->devCommCreated = true;
  g->ginEnabled = g->devComm.ginContextCount > 0;
  g->nodeSize = g->nLsaTeams > 1 ? g->lsaSize : g->lsaSize / g->virtualNodes;
}

// HT mode across real nodes (several LSA teams): the node count is known only now, after the
// window was planned (from virtualNodes) and registered. If the HT hierarchical regions were
// planned for another count, the window is replaced by one planned for nLsaTeams nodes
// (collective: every rank sees the same topology). A caller-sized window too small for it is
// kept; the HT calls then refuse with ncclepUnsupported. Not run yet: no multi-node machine.
ncclepResult_t replanForNodes(ncclepGroup* g) {
  if (g->config.mode != NCCLEP_MODE_HT || !g->devCommCreated || g->nLsaTeams <= 1 ||
      g->plan.ht.nodes == g->nLsaTeams)
    return ncclepSuccess;
  BufferPlan plan;
  NCCLEP_CHECK(planBuffers(g->config, g->nRanks, g->nLsaTeams, &plan));
  if (plan.ht.nodes != g->nLsaTeams) return ncclepSuccess;
  size_t bytes = plan.totalBytes;
  if (g->config.windowBytes != 0) {
    if (g->windowBytes < plan.totalBytes) return ncclepSuccess;
    bytes = g->windowBytes;
  }
  NCCLEP_CUDA_CHECK(cudaDeviceSynchronize(), "cudaDeviceSynchronize before replacing the window");
  NCCLEP_NCCL_CHECK(ncclCommWindowDeregister(g->comm, g->window), g->comm, "ncclCommWindowDeregister");
  g->window = nullptr;
  NCCLEP_NCCL_CHECK(ncclMemFree(g->windowPtr), g->comm, "ncclMemFree");
  g->windowPtr = nullptr;
  void* ptr = nullptr;
  NCCLEP_NCCL_CHECK(ncclMemAlloc(&ptr, bytes), g->comm, "ncclMemAlloc(%zu)", bytes);
  g->windowPtr = ptr;
  NCCLEP_CUDA_CHECK(cudaMemset(g->windowPtr, 0, bytes), "cudaMemset(window, 0, %zu)", bytes);
  NCCLEP_CUDA_CHECK(cudaDeviceSynchronize(), "cudaDeviceSynchronize after zeroing the window");
  ncclWindow_t win = nullptr;
  NCCLEP_NCCL_CHECK(ncclCommWindowRegister(g->comm, g->windowPtr, bytes, &win, NCCL_WIN_COLL_SYMMETRIC), g->comm,
                    "ncclCommWindowRegister(%zu bytes, NCCL_WIN_COLL_SYMMETRIC)", bytes);
  g->window = win;
  g->windowBytes = bytes;
  g->plan = plan;
  return ncclepSuccess;
}

}  // namespace

std::unique_ptr<ncclepGroup> newGroup(int rank, int nRanks, int cudaDevice, const ncclepGroupConfig_t& config,
                                      size_t windowBytes, const BufferPlan& plan) {
  auto g = std::make_unique<ncclepGroup>();
  g->rank = rank;
  g->nRanks = nRanks;
  g->cudaDevice = cudaDevice;
  g->config = config;
  g->windowBytes = windowBytes;
  g->plan = plan;
  return g;
}

ncclepResult_t resolveDeviceShape(ncclepGroup* g) {
  NCCLEP_CUDA_CHECK(cudaDeviceGetAttribute(&g->deviceSms, cudaDevAttrMultiProcessorCount, g->cudaDevice),
                    "cudaDeviceGetAttribute(multiProcessorCount)");
  if (g->config.mode != NCCLEP_MODE_HT && groupKernelSms(g) > kLLMaxBlocks)
    return setError(ncclepInvalidArgument, "the LL kernels run on %d SMs, more than their limit %d (set numSms)",
                    groupKernelSms(g), kLLMaxBlocks);
  // The config's virtualNodes wins; C programs may also set NCCLEP_VIRTUAL_NODES.
  if (g->config.virtualNodes > 1) {
    g->virtualNodes = g->config.virtualNodes;
  } else if (const char* v = std::getenv("NCCLEP_VIRTUAL_NODES")) {
    char* end = nullptr;
    const long n = std::strtol(v, &end, 10);
    if (end == v || *end != '\0' || n < 1 || n > g->nRanks)
      return setError(ncclepInvalidArgument, "NCCLEP_VIRTUAL_NODES=%s: must be an integer in [1, %d]", v, g->nRanks);
    g->virtualNodes = int(n);
  }
  return ncclepSuccess;
}

ncclepResult_t createLocalResources(ncclepGroup* g) {
  NCCLEP_CHECK(resolveDeviceShape(g));
  NCCLEP_CUDA_CHECK(cudaMalloc(&g->checkResult, sizeof(kernels::LsaCheckResult)),
                    "cudaMalloc(%zu) for the LSA check result", sizeof(kernels::LsaCheckResult));
  NCCLEP_CUDA_CHECK(cudaEventCreateWithFlags(&g->checkDone, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  NCCLEP_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&g->errorHost), sizeof(DeviceError), cudaHostAllocMapped),
                    "cudaHostAlloc(error word)");
  std::memset(g->errorHost, 0, sizeof(DeviceError));
  NCCLEP_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&g->errorDevice), g->errorHost, 0),
                    "cudaHostGetDevicePointer(error word)");
  return ncclepSuccess;
}

namespace {

ncclepResult_t createGroup(ncclepGroup* g, const ncclepUniqueId& uniqueId) {
  DeviceGuard guard;
  NCCLEP_CHECK(guard.set(g->cudaDevice));

  // Local resources first, so that no failure after here leaves peers waiting
  // in a collective we never join, except failures of the collectives themselves.
  NCCLEP_CHECK(createLocalResources(g));

  ncclUniqueId id;
  std::memcpy(&id, &uniqueId, sizeof(id));
  ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
  cfg.blocking = 1;
  cfg.commName = "ncclep";
  ncclComm_t comm = nullptr;
  NCCLEP_NCCL_CHECK(ncclCommInitRankConfig(&comm, g->nRanks, id, g->rank, &cfg), nullptr,
                    "ncclCommInitRankConfig(nRanks=%d, rank=%d, cudaDevice=%d)", g->nRanks, g->rank,
                    g->cudaDevice);
  g->comm = comm;

  void* ptr = nullptr;
  NCCLEP_NCCL_CHECK(ncclMemAlloc(&ptr, g->windowBytes), g->comm, "ncclMemAlloc(%zu)", g->windowBytes);
  g->windowPtr = ptr;
  // Zero before registering: peers can reach the window only after registration,
  // and no stale pattern or flag may survive from an earlier user of the memory.
  NCCLEP_CUDA_CHECK(cudaMemset(g->windowPtr, 0, g->windowBytes), "cudaMemset(window, 0, %zu)", g->windowBytes);
  NCCLEP_CUDA_CHECK(cudaDeviceSynchronize(), "cudaDeviceSynchronize after zeroing the window");

  ncclWindow_t win = nullptr;
  NCCLEP_NCCL_CHECK(ncclCommWindowRegister(g->comm, g->windowPtr, g->windowBytes, &win, NCCL_WIN_COLL_SYMMETRIC),
                    g->comm, "ncclCommWindowRegister(%zu bytes, NCCL_WIN_COLL_SYMMETRIC)", g->windowBytes);
  g->window = win;

  createDeviceComm(g);
  return replanForNodes(g);
}

}  // namespace

// Aborting the comm (not `graceful`) also drops its registrations.
ncclepResult_t destroyGroup(ncclepGroup* g, bool graceful) {
  ncclepResult_t first = ncclepSuccess;
  std::string firstMsg;
  auto note = [&](ncclepResult_t r) {
    if (r != ncclepSuccess && first == ncclepSuccess) {
      first = r;
      firstMsg = ncclepGetLastError();
    }
  };

  if (g->loopback && g->broken) g->loopback->leak = true;  // a kernel may still run: keep the windows
  if (g->broken) {
    // A kernel of this group may still spin on a barrier: anything that
    // synchronises the device (cudaFree, comm teardown) could hang forever.
    setError(ncclepSuccess, "group destroyed after a timeout: its device resources were leaked on purpose");
    return ncclepSuccess;
  }

  DeviceGuard guard;
  if (g->cudaDevice >= 0) note(guard.set(g->cudaDevice));

  if (g->loopback) {  // no NCCL: the windows belong to the loopback set and go with its last group
    const cudaError_t e = cudaDeviceSynchronize();  // as the graceful teardown: our kernels end first
    if (e != cudaSuccess) note(cudaFailure(e, "cudaDeviceSynchronize before destroying a loopback group"));
    g->window = nullptr;
    g->windowPtr = nullptr;
    g->loopback.reset();
  }

  if (graceful && g->comm != nullptr) {
    cudaError_t e = cudaDeviceSynchronize();
    if (e != cudaSuccess) note(cudaFailure(e, "cudaDeviceSynchronize before destroying the group"));
    if (g->devCommCreated) {
      ncclResult_t r = ncclDevCommDestroy(g->comm, &g->devComm);
      if (r != ncclSuccess) note(ncclFailure(r, g->comm, "ncclDevCommDestroy"));
      g->devCommCreated = false;
    }
    if (g->window != nullptr) {
      ncclResult_t r = ncclCommWindowDeregister(g->comm, g->window);
      if (r != ncclSuccess) note(ncclFailure(r, g->comm, "ncclCommWindowDeregister"));
      g->window = nullptr;
    }
  }
  if (g->windowPtr != nullptr && graceful) {
    ncclResult_t r = ncclMemFree(g->windowPtr);
    if (r != ncclSuccess) note(ncclFailure(r, g->comm, "ncclMemFree"));
    g->windowPtr = nullptr;
  }
  if (g->comm != nullptr) {
    bool destroyed = false;
    if (graceful) {
      ncclResult_t r = ncclCommFinalize(g->comm);
      if (r != ncclSuccess) {
        note(ncclFailure(r, g->comm, "ncclCommFinalize"));
      } else {
        r = ncclCommDestroy(g->comm);
        if (r != ncclSuccess) note(ncclFailure(r, g->comm, "ncclCommDestroy"));
        destroyed = true;
      }
    }
    if (!destroyed) {
      ncclResult_t r = ncclCommAbort(g->comm);
      if (r != ncclSuccess) note(ncclFailure(r, nullptr, "ncclCommAbort"));
    }
    g->comm = nullptr;
  }
  // After the abort, NCCL holds no reference to the window memory any more.
  if (g->windowPtr != nullptr) {
    ncclResult_t r = ncclMemFree(g->windowPtr);
    if (r != ncclSuccess) note(ncclFailure(r, nullptr, "ncclMemFree"));
    g->windowPtr = nullptr;
  }
  if (g->checkDone != nullptr) {
    cudaError_t e = cudaEventDestroy(g->checkDone);
    if (e != cudaSuccess) note(cudaFailure(e, "cudaEventDestroy"));
    g->checkDone = nullptr;
  }
  if (g->errorHost != nullptr) {
    cudaError_t e = cudaFreeHost(g->errorHost);
    if (e != cudaSuccess) note(cudaFailure(e, "cudaFreeHost(error word)"));
    g->errorHost = g->errorDevice = nullptr;
  }
  if (g->checkResult != nullptr) {
    cudaError_t e = cudaFree(g->checkResult);
    if (e != cudaSuccess) note(cudaFailure(e, "cudaFree(LSA check result)"));
    g->checkResult = nullptr;
  }
  if (first != ncclepSuccess) setError(first, "%s", firstMsg.c_str());
  return first;
}

}  // namespace ncclep

using ncclep::setError;

extern "C" ncclepResult_t ncclepGetVersion(int* version) {
  if (version == nullptr) return setError(ncclepInvalidArgument, "ncclepGetVersion: version is NULL");
  *version = NCCLEP_VERSION_CODE;
  return ncclepSuccess;
}

extern "C" ncclepResult_t ncclepGetUniqueId(ncclepUniqueId* uniqueId) {
  NCCLEP_API_TRY
  if (uniqueId == nullptr) return setError(ncclepInvalidArgument, "ncclepGetUniqueId: uniqueId is NULL");
  ncclUniqueId id;
  NCCLEP_NCCL_CHECK(ncclGetUniqueId(&id), nullptr, "ncclGetUniqueId");
  std::memcpy(uniqueId, &id, sizeof(id));
  return ncclepSuccess;
  NCCLEP_API_CATCH
}

extern "C" ncclepResult_t ncclepGroupCreate(ncclepGroup_t* out, ncclepUniqueId uniqueId, int nRanks, int rank,
                                            int cudaDevice, const ncclepGroupConfig_t* config) {
  NCCLEP_API_TRY
  if (out != nullptr) *out = nullptr;
  size_t windowBytes = 0;
  ncclep::BufferPlan plan;
  NCCLEP_CHECK(ncclep::checkCreateArgs(out, nRanks, rank, cudaDevice, config, &windowBytes, &plan));

  std::unique_ptr<ncclepGroup> g = ncclep::newGroup(rank, nRanks, cudaDevice, *config, windowBytes, plan);

  ncclepResult_t res = ncclep::createGroup(g.get(), uniqueId);
  if (res != ncclepSuccess) {
    std::string msg = ncclepGetLastError();
    ncclep::destroyGroup(g.get(), /*graceful=*/false);
    return setError(res, "%s", msg.c_str());
  }
  if (!g->devCommCreated) setError(ncclepSuccess, "NCCL device API unavailable: %s", g->deviceApiError.c_str());
  *out = g.release();
  return ncclepSuccess;
  NCCLEP_API_CATCH
}

extern "C" ncclepResult_t ncclepGroupDestroy(ncclepGroup_t group) {
  if (group == nullptr) return ncclepSuccess;
  ncclepResult_t res = ncclepInternalError;
  try {
    res = ncclep::destroyGroup(group, /*graceful=*/true);
  } catch (...) {
    res = setError(ncclepInternalError, "ncclepGroupDestroy: unexpected exception");
  }
  delete group;
  return res;
}

extern "C" ncclepResult_t ncclepGroupGetInfo(ncclepGroup_t g, ncclepGroupInfo_t* info) {
  if (g == nullptr) return setError(ncclepInvalidArgument, "ncclepGroupGetInfo: group is NULL");
  if (info == nullptr) return setError(ncclepInvalidArgument, "ncclepGroupGetInfo: info is NULL");
  if (info->version != NCCLEP_GROUP_INFO_VERSION || info->size != sizeof(ncclepGroupInfo_t))
    return setError(ncclepInvalidArgument,
                    "ncclepGroupGetInfo: info.size = %zu, info.version = %u (expected %zu, %u): initialise "
                    "it with NCCLEP_GROUP_INFO_INITIALIZER",
                    info->size, info->version, sizeof(ncclepGroupInfo_t), NCCLEP_GROUP_INFO_VERSION);
  int ncclVersion = 0;
  if (ncclGetVersion(&ncclVersion) != ncclSuccess) ncclVersion = 0;
  info->rank = g->rank;
  info->nRanks = g->nRanks;
  info->cudaDevice = g->cudaDevice;
  info->lsaRank = g->lsaRank;
  info->lsaSize = g->lsaSize;
  info->nLsaTeams = g->nLsaTeams;
  info->deviceApiAvailable = g->devCommCreated ? 1 : 0;
  info->ginEnabled = g->ginEnabled ? 1 : 0;
  info->windowBytes = g->windowBytes;
  info->ncclVersion = ncclVersion;
  info->nodeSize = g->nodeSize;
  info->kernelSms = ncclep::groupKernelSms(g);
  info->ncclHeaderVersion = NCCL_VERSION_CODE;
  return ncclepSuccess;
}
