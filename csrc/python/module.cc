// ncclep._C: Python binding of the C API (csrc/include/ncclep.h).
// Errors raise RuntimeError carrying ncclepGetLastError()'s text.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

#include <nccl.h>

#include "common/device_error.h"
#include "ncclep.h"

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

namespace py = pybind11;

namespace {

// A versioned args struct of the C API, zeroed, with its size and version set.
template <typename Args>
Args zeroedArgs(unsigned version) {
  Args a;
  std::memset(&a, 0, sizeof(a));
  a.size = sizeof(a);
  a.version = version;
  return a;
}

[[noreturn]] void raise(ncclepResult_t res) {
  std::string msg = ncclepGetLastError();
  if (msg.empty()) msg = "no detail";
  throw std::runtime_error(msg + " (" + ncclepGetErrorString(res) + ")");
}

void check(ncclepResult_t res) {
  if (res != ncclepSuccess) raise(res);
}

ncclepGroupConfig_t makeConfig(int mode, int numExperts, int maxTokensPerRank, int hidden, int maxTopk,
                               int numSms, double timeoutSeconds, size_t windowBytes, int virtualNodes) {
  ncclepGroupConfig_t config = NCCLEP_GROUP_CONFIG_INITIALIZER;
  config.mode = mode;
  config.numExperts = numExperts;
  config.maxTokensPerRank = maxTokensPerRank;
  config.hidden = hidden;
  config.maxTopk = maxTopk;
  config.numSms = numSms;
  config.timeoutSeconds = timeoutSeconds;
  config.windowBytes = windowBytes;
  config.virtualNodes = virtualNodes;
  return config;
}

// None when the kernels serve it, else the reason (ncclepQueryKernelSupport / ...GroupQuery...).
py::object supportReason(int supported, const char* why) {
  if (supported) return py::none();
  return py::str(why);
}

std::string deviceErrorName(int code) {
  switch (code) {
    case ncclep::kDeviceTimeout: return "timeout";
    case ncclep::kDeviceBadExpert: return "bad_expert";
    case ncclep::kDeviceDuplicateExpert: return "duplicate_expert";
    case ncclep::kDeviceProtocol: return "protocol";
    case ncclep::kDevicePeerRejected: return "peer_rejected";
    default: return "code " + std::to_string(code);
  }
}

bool interpreterFinalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

class Communicator {
 public:
  Communicator(const py::bytes& uniqueId, int worldSize, int rank, int cudaDevice, int mode, int numExperts,
               int maxTokensPerRank, int hidden, int maxTopk, int numSms, double timeoutSeconds,
               size_t windowBytes, int virtualNodes) {
    std::string id = uniqueId;
    if (id.size() != NCCLEP_UNIQUE_ID_BYTES)
      throw py::value_error("unique_id must be " + std::to_string(NCCLEP_UNIQUE_ID_BYTES) + " bytes, got " +
                            std::to_string(id.size()));
    ncclepUniqueId uid;
    std::memcpy(uid.internal, id.data(), NCCLEP_UNIQUE_ID_BYTES);
    ncclepGroupConfig_t config = makeConfig(mode, numExperts, maxTokensPerRank, hidden, maxTopk, numSms,
                                            timeoutSeconds, windowBytes, virtualNodes);
    ncclepResult_t res;
    {
      py::gil_scoped_release nogil;  // collective: blocks until every rank joins
      res = ncclepGroupCreate(&group_, uid, worldSize, rank, cudaDevice, &config);
    }
    check(res);
    ncclepGroupInfo_t info = NCCLEP_GROUP_INFO_INITIALIZER;
    check(ncclepGroupGetInfo(group_, &info));
    if (!info.deviceApiAvailable) deviceApiError_ = ncclepGetLastError();
  }

  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  ~Communicator() {
    // Tearing down NCCL and CUDA state during interpreter shutdown can hang or
    // crash (CUDA may already be unloading); the process is ending anyway.
    if (group_ != nullptr && !interpreterFinalizing()) {
      try {
        close();
      } catch (...) {
      }
    }
  }

  py::dict info() {
    std::lock_guard<std::mutex> lock(mu_);
    ncclepGroupInfo_t info = NCCLEP_GROUP_INFO_INITIALIZER;
    check(ncclepGroupGetInfo(openGroup(), &info));
    py::dict d;
    d["rank"] = info.rank;
    d["world_size"] = info.nRanks;
    d["cuda_device"] = info.cudaDevice;
    d["lsa_rank"] = info.lsaRank;
    d["lsa_size"] = info.lsaSize;
    d["n_lsa_teams"] = info.nLsaTeams;
    d["device_api"] = info.deviceApiAvailable != 0;
    d["gin"] = info.ginEnabled != 0;
    d["window_bytes"] = info.windowBytes;
    d["nccl_version"] = info.ncclVersion;
    d["node_size"] = info.nodeSize;
    d["kernel_sms"] = info.kernelSms;
    d["nccl_header_version"] = info.ncclHeaderVersion;
    return d;
  }

  // None when this group's kernels can serve it, else why not.
  py::object kernelSupport() {
    std::lock_guard<std::mutex> lock(mu_);
    int supported = 0;
    char why[512] = {0};
    check(ncclepGroupQueryKernelSupport(openGroup(), &supported, why, sizeof(why)));
    return supportReason(supported, why);
  }

  // stream: a raw cudaStream_t as an int; None = torch's current stream on the group's device.
  bool checkLsa(const py::object& stream) {
    uintptr_t raw = stream.is_none() ? currentTorchStream() : stream.cast<uintptr_t>();
    int ok = 0;
    bool closed = false;
    ncclepResult_t res = ncclepSuccess;
    {
      py::gil_scoped_release nogil;
      std::lock_guard<std::mutex> lock(mu_);
      if (group_ == nullptr) {
        closed = true;
      } else {
        res = ncclepGroupCheckLsa(group_, reinterpret_cast<cudaStream_t>(raw), &ok);
      }
    }
    if (closed) throw std::runtime_error("Communicator is closed");
    check(res);
    return ok != 0;
  }

  void close() {
    ncclepResult_t res;
    {
      py::gil_scoped_release nogil;
      std::lock_guard<std::mutex> lock(mu_);
      res = ncclepGroupDestroy(group_);
      group_ = nullptr;
    }
    check(res);
  }

  // The LL calls take raw device pointers (ints) and a raw cudaStream_t; ncclep/ops.py owns the
  // tensors and their checks.
  void llDispatch(int phases, int numTokens, int hidden, int topk, uintptr_t x, uintptr_t topkIdx, int topkIdxBits,
                  uintptr_t topkWeights, bool useFp8, bool ue8m0, uintptr_t recvX, uintptr_t recvScales,
                  uintptr_t expertCounts, uintptr_t sendSlots, uintptr_t recvRows, uintptr_t recvWeights,
                  uintptr_t recvSlotCounts, uintptr_t stream, uintptr_t trace) {
    auto a = zeroedArgs<ncclepLLDispatchArgs_t>(NCCLEP_LL_ARGS_VERSION);
    a.phases = phases;
    a.numTokens = numTokens;
    a.hidden = hidden;
    a.topk = topk;
    a.x = reinterpret_cast<const void*>(x);
    a.topkIdx = reinterpret_cast<const void*>(topkIdx);
    a.topkIdxBits = topkIdxBits;
    a.topkWeights = reinterpret_cast<const float*>(topkWeights);
    a.useFp8 = useFp8;
    a.ue8m0 = ue8m0;
    a.recvX = reinterpret_cast<void*>(recvX);
    a.recvScales = reinterpret_cast<void*>(recvScales);
    a.expertCounts = reinterpret_cast<int*>(expertCounts);
    a.sendSlots = reinterpret_cast<int*>(sendSlots);
    a.recvRows = reinterpret_cast<int*>(recvRows);
    a.recvWeights = reinterpret_cast<float*>(recvWeights);
    a.recvSlotCounts = reinterpret_cast<int*>(recvSlotCounts);
    a.trace = reinterpret_cast<unsigned long long*>(trace);
    std::lock_guard<std::mutex> lock(mu_);
    check(ncclepLLDispatch(openGroup(), &a, reinterpret_cast<cudaStream_t>(stream)));
  }

  void llCombine(int phases, int numTokens, int hidden, uintptr_t expertOut, uintptr_t sendSlots, uintptr_t recvRows,
                 uintptr_t recvWeights, uintptr_t recvSlotCounts, uintptr_t out, uintptr_t stream) {
    auto a = zeroedArgs<ncclepLLCombineArgs_t>(NCCLEP_LL_ARGS_VERSION);
    a.phases = phases;
    a.numTokens = numTokens;
    a.hidden = hidden;
    a.expertOut = reinterpret_cast<const void*>(expertOut);
    a.sendSlots = reinterpret_cast<const int*>(sendSlots);
    a.recvRows = reinterpret_cast<const int*>(recvRows);
    a.recvWeights = reinterpret_cast<const float*>(recvWeights);
    a.recvSlotCounts = reinterpret_cast<const int*>(recvSlotCounts);
    a.out = reinterpret_cast<void*>(out);
    std::lock_guard<std::mutex> lock(mu_);
    check(ncclepLLCombine(openGroup(), &a, reinterpret_cast<cudaStream_t>(stream)));
  }

  // The HT calls, like the LL ones: raw device pointers and a raw cudaStream_t (ncclep/cuda_ht.py).
  void htDispatch(int numTokens, int hidden, int topk, bool useFp8, int scaleBytes, uintptr_t x, uintptr_t xScales,
                  uintptr_t topkIdx, int topkIdxBits, uintptr_t topkWeights, int layout, int alignment,
                  long long numRows, uintptr_t recvX, uintptr_t recvScales, uintptr_t recvTopkIdx,
                  uintptr_t recvTopkWeights, uintptr_t numRecv, uintptr_t expertCounts, uintptr_t sendPos,
                  uintptr_t recvSlot, uintptr_t recvCounts, uintptr_t stream) {
    auto a = zeroedArgs<ncclepHTDispatchArgs_t>(NCCLEP_HT_ARGS_VERSION);
    a.phases = NCCLEP_PHASE_ALL;
    a.numTokens = numTokens;
    a.hidden = hidden;
    a.topk = topk;
    a.useFp8 = useFp8;
    a.scaleBytes = scaleBytes;
    a.x = reinterpret_cast<const void*>(x);
    a.xScales = reinterpret_cast<const void*>(xScales);
    a.topkIdx = reinterpret_cast<const void*>(topkIdx);
    a.topkIdxBits = topkIdxBits;
    a.topkWeights = reinterpret_cast<const float*>(topkWeights);
    a.layout = layout;
    a.alignment = alignment;
    a.numRows = numRows;
    a.recvX = reinterpret_cast<void*>(recvX);
    a.recvScales = reinterpret_cast<void*>(recvScales);
    a.recvTopkIdx = reinterpret_cast<int*>(recvTopkIdx);
    a.recvTopkWeights = reinterpret_cast<float*>(recvTopkWeights);
    a.numRecv = reinterpret_cast<int*>(numRecv);
    a.expertCounts = reinterpret_cast<int*>(expertCounts);
    a.sendPos = reinterpret_cast<int*>(sendPos);
    a.recvSlot = reinterpret_cast<int*>(recvSlot);
    a.recvCounts = reinterpret_cast<int*>(recvCounts);
    std::lock_guard<std::mutex> lock(mu_);
    check(ncclepHTDispatch(openGroup(), &a, reinterpret_cast<cudaStream_t>(stream)));
  }

  void htCombine(int numTokens, int hidden, int topk, long long numRows, uintptr_t x, uintptr_t topkWeights,
                 uintptr_t sendPos, uintptr_t recvSlot, uintptr_t recvCounts, uintptr_t recvTopkIdx, uintptr_t out,
                 uintptr_t outWeights, uintptr_t stream) {
    auto a = zeroedArgs<ncclepHTCombineArgs_t>(NCCLEP_HT_ARGS_VERSION);
    a.phases = NCCLEP_PHASE_ALL;
    a.numTokens = numTokens;
    a.hidden = hidden;
    a.topk = topk;
    a.numRows = numRows;
    a.x = reinterpret_cast<const void*>(x);
    a.topkWeights = reinterpret_cast<const float*>(topkWeights);
    a.sendPos = reinterpret_cast<const int*>(sendPos);
    a.recvSlot = reinterpret_cast<const int*>(recvSlot);
    a.recvCounts = reinterpret_cast<const int*>(recvCounts);
    a.recvTopkIdx = reinterpret_cast<const int*>(recvTopkIdx);
    a.out = reinterpret_cast<void*>(out);
    a.outWeights = reinterpret_cast<float*>(outWeights);
    std::lock_guard<std::mutex> lock(mu_);
    check(ncclepHTCombine(openGroup(), &a, reinterpret_cast<cudaStream_t>(stream)));
  }

  void htDispatchCached(int numTokens, int rowBytes, long long numRows, uintptr_t x, uintptr_t sendPos,
                        uintptr_t recvSlot, uintptr_t out, uintptr_t stream) {
    auto a = zeroedArgs<ncclepHTCachedDispatchArgs_t>(NCCLEP_HT_ARGS_VERSION);
    a.phases = NCCLEP_PHASE_ALL;
    a.numTokens = numTokens;
    a.rowBytes = rowBytes;
    a.numRows = numRows;
    a.x = reinterpret_cast<const void*>(x);
    a.sendPos = reinterpret_cast<const int*>(sendPos);
    a.recvSlot = reinterpret_cast<const int*>(recvSlot);
    a.out = reinterpret_cast<void*>(out);
    std::lock_guard<std::mutex> lock(mu_);
    check(ncclepHTCachedDispatch(openGroup(), &a, reinterpret_cast<cudaStream_t>(stream)));
  }

  // This rank rejected its arguments of `op` ("ll_dispatch", "ll_combine", "ht_dispatch", "ht_combine"
  // or "ht_dispatch_cached"): takes part in the call with rejectCode = code (ncclep.h, "Rejected
  // calls"), moving nothing.
  void reject(const std::string& op, int code, uintptr_t stream) {
    const auto s = reinterpret_cast<cudaStream_t>(stream);
    std::lock_guard<std::mutex> lock(mu_);
    if (op == "ll_dispatch") {
      auto a = zeroedArgs<ncclepLLDispatchArgs_t>(NCCLEP_LL_ARGS_VERSION);
      a.phases = NCCLEP_PHASE_ALL;
      a.rejectCode = code;
      check(ncclepLLDispatch(openGroup(), &a, s));
    } else if (op == "ll_combine") {
      auto a = zeroedArgs<ncclepLLCombineArgs_t>(NCCLEP_LL_ARGS_VERSION);
      a.phases = NCCLEP_PHASE_ALL;
      a.rejectCode = code;
      check(ncclepLLCombine(openGroup(), &a, s));
    } else if (op == "ht_dispatch") {
      auto a = zeroedArgs<ncclepHTDispatchArgs_t>(NCCLEP_HT_ARGS_VERSION);
      a.phases = NCCLEP_PHASE_ALL;
      a.rejectCode = code;
      check(ncclepHTDispatch(openGroup(), &a, s));
    } else if (op == "ht_combine") {
      auto a = zeroedArgs<ncclepHTCombineArgs_t>(NCCLEP_HT_ARGS_VERSION);
      a.phases = NCCLEP_PHASE_ALL;
      a.rejectCode = code;
      check(ncclepHTCombine(openGroup(), &a, s));
    } else if (op == "ht_dispatch_cached") {
      auto a = zeroedArgs<ncclepHTCachedDispatchArgs_t>(NCCLEP_HT_ARGS_VERSION);
      a.phases = NCCLEP_PHASE_ALL;
      a.rejectCode = code;
      check(ncclepHTCachedDispatch(openGroup(), &a, s));
    } else {
      throw py::value_error("reject: unknown op " + op);
    }
  }

  long long htNumRows(int topk, int layout, int alignment) {
    long long rows = 0;
    std::lock_guard<std::mutex> lock(mu_);
    check(ncclepHTNumRows(openGroup(), topk, layout, alignment, &rows));
    return rows;
  }

  int htMaxRowBytes() {
    int bytes = 0;
    std::lock_guard<std::mutex> lock(mu_);
    check(ncclepHTMaxRowBytes(openGroup(), &bytes));
    return bytes;
  }

  // None, or (code, phase, peer, value) of the error word with the code and phase by name
  // ("timeout", "bad_expert", "duplicate_expert", "peer_rejected", "protocol"; ncclepPhaseName);
  // bad-input codes and a peer's rejection are cleared by the read.
  py::object deviceError() {
    std::lock_guard<std::mutex> lock(mu_);
    ncclepDeviceError_t e;
    check(ncclepGroupGetDeviceError(openGroup(), &e));
    if (e.code == ncclep::kDeviceOk) return py::none();
    return py::make_tuple(deviceErrorName(e.code), ncclepPhaseName(e.phase), e.peer, e.value);
  }

  py::object deviceApiError() const {
    if (deviceApiError_.empty()) return py::none();
    return py::str(deviceApiError_);
  }

 private:
  ncclepGroup_t openGroup() const {
    if (group_ == nullptr) throw std::runtime_error("Communicator is closed");
    return group_;
  }

  uintptr_t currentTorchStream() {
    ncclepGroupInfo_t info = NCCLEP_GROUP_INFO_INITIALIZER;
    check(ncclepGroupGetInfo(openGroup(), &info));
    try {
      py::object cuda = py::module_::import("torch").attr("cuda");
      return cuda.attr("current_stream")(info.cudaDevice).attr("cuda_stream").cast<uintptr_t>();
    } catch (const py::error_already_set&) {
      return 0;  // no usable torch: the legacy default stream
    }
  }

  ncclepGroup_t group_ = nullptr;
  std::string deviceApiError_;
  std::mutex mu_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ncclep C API binding";
  m.attr("MODE_LL") = NCCLEP_MODE_LL;
  m.attr("MODE_HT") = NCCLEP_MODE_HT;
  m.attr("UNIQUE_ID_BYTES") = NCCLEP_UNIQUE_ID_BYTES;
  m.attr("KERNEL_MODES") = py::make_tuple("ll", "ht");  // modes with dispatch/combine kernels
  m.attr("PHASE_SEND") = NCCLEP_PHASE_SEND;
  m.attr("PHASE_RECV") = NCCLEP_PHASE_RECV;
  m.attr("PHASE_ALL") = NCCLEP_PHASE_ALL;
  m.attr("HT_LAYOUT_FLAT") = NCCLEP_HT_LAYOUT_FLAT;
  m.attr("HT_LAYOUT_EXPERT_MAJOR") = NCCLEP_HT_LAYOUT_EXPERT_MAJOR;

  m.attr("NCCL_HEADER_VERSION") = NCCL_VERSION_CODE;

  m.def("phase_name", &ncclepPhaseName, py::arg("phase"), "name of a device-error phase");
  m.def("reject_reason_name", &ncclepRejectReasonName, py::arg("reason"),
        "name of a reject reason (ncclepRejectReason_t), e.g. 'shape'");
  m.attr("NUM_REJECT_REASONS") = int(ncclepNumRejectReasons);

  m.def(
      "limits",
      []() {
        ncclepLimits_t l = NCCLEP_LIMITS_INITIALIZER;
        check(ncclepGetLimits(&l));
        py::dict d;
        d["max_topk"] = l.maxTopk;
        d["fp8_block"] = l.fp8Block;
        d["ll_max_ranks"] = l.llMaxRanks;
        d["ll_max_experts"] = l.llMaxExperts;
        d["ll_max_topk"] = l.llMaxTopk;
        d["ll_max_entries"] = l.llMaxEntries;
        d["ll_hidden_multiple"] = l.llHiddenMultiple;
        d["ht_max_ranks"] = l.htMaxRanks;
        d["ht_max_experts"] = l.htMaxExperts;
        d["ht_max_local_experts"] = l.htMaxLocalExperts;
        d["ht_max_topk"] = l.htMaxTopk;
        d["ht_hidden_multiple"] = l.htHiddenMultiple;
        d["ht_default_sms"] = l.htDefaultSms;
        d["ht_min_sms"] = l.htMinSms;
        d["ht_min_sms_hierarchical"] = l.htMinSmsHierarchical;
        return d;
      },
      "the kernels' limits and defaults (ncclepGetLimits)");

  m.def(
      "kernel_support",
      [](int mode, int numExperts, int maxTokensPerRank, int hidden, int maxTopk, int nRanks, int nLsaTeams,
         bool ginEnabled, bool deviceApiAvailable) {
        ncclepGroupConfig_t config =
            makeConfig(mode, numExperts, maxTokensPerRank, hidden, maxTopk, 0, 100.0, 0, 0);
        ncclepTopology_t topology = NCCLEP_TOPOLOGY_INITIALIZER;
        topology.nRanks = nRanks;
        topology.nLsaTeams = nLsaTeams;
        topology.ginEnabled = ginEnabled;
        topology.deviceApiAvailable = deviceApiAvailable;
        int supported = 0;
        char why[512] = {0};
        check(ncclepQueryKernelSupport(&config, &topology, &supported, why, sizeof(why)));
        return supportReason(supported, why);
      },
      py::arg("mode"), py::arg("num_experts"), py::arg("max_tokens_per_rank"), py::arg("hidden"),
      py::arg("max_topk"), py::arg("n_ranks"), py::arg("n_lsa_teams"), py::arg("gin_enabled"),
      py::arg("device_api_available"), "None when the kernels serve such a group, else why not");

  m.def(
      "ht_num_rows",
      [](int numExperts, int maxTokensPerRank, int hidden, int maxTopk, int nRanks, int topk, int layout,
         int alignment) {
        ncclepGroupConfig_t config =
            makeConfig(NCCLEP_MODE_HT, numExperts, maxTokensPerRank, hidden, maxTopk, 0, 100.0, 0, 0);
        long long rows = 0;
        check(ncclepHTNumRowsFor(&config, nRanks, topk, layout, alignment, &rows));
        return rows;
      },
      py::arg("num_experts"), py::arg("max_tokens_per_rank"), py::arg("hidden"), py::arg("max_topk"),
      py::arg("n_ranks"), py::arg("topk"), py::arg("layout"), py::arg("alignment"),
      "worst-case rows of an HT dispatch output (ncclepHTNumRowsFor)");

  m.def("last_error", []() { return std::string(ncclepGetLastError()); },
        "ncclepGetLastError() of this thread, e.g. why check_lsa returned False");

  m.def("version", []() {
    int v = 0;
    check(ncclepGetVersion(&v));
    return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." + std::to_string(v % 100);
  });

  m.def("nccl_version", []() {
    int v = 0;
    ncclResult_t res = ncclGetVersion(&v);
    if (res != ncclSuccess) throw std::runtime_error(std::string("ncclGetVersion failed: ") + ncclGetErrorString(res));
    return v;
  });

  m.def("get_unique_id", []() {
    ncclepUniqueId id;
    check(ncclepGetUniqueId(&id));
    return py::bytes(id.internal, NCCLEP_UNIQUE_ID_BYTES);
  });

  m.def(
      "window_bytes",
      [](int mode, int numExperts, int maxTokensPerRank, int hidden, int maxTopk, int worldSize) {
        ncclepGroupConfig_t config =
            makeConfig(mode, numExperts, maxTokensPerRank, hidden, maxTopk, 0, 100.0, 0, 0);
        size_t bytes = 0;
        check(ncclepComputeWindowBytes(&config, worldSize, &bytes));
        return bytes;
      },
      py::arg("mode"), py::arg("num_experts"), py::arg("max_tokens_per_rank"), py::arg("hidden"),
      py::arg("max_topk"), py::arg("world_size"));

  py::class_<Communicator>(m, "Communicator")
      .def(py::init<const py::bytes&, int, int, int, int, int, int, int, int, int, double, size_t, int>(),
           py::arg("unique_id"), py::arg("world_size"), py::arg("rank"), py::arg("cuda_device"), py::arg("mode"),
           py::arg("num_experts"), py::arg("max_tokens_per_rank"), py::arg("hidden"), py::arg("max_topk"),
           py::arg("num_sms"), py::arg("timeout_s"), py::arg("window_bytes") = 0, py::arg("virtual_nodes") = 0)
      .def("info", &Communicator::info)
      .def("kernel_support", &Communicator::kernelSupport)
      .def("check_lsa", &Communicator::checkLsa, py::arg("stream") = py::none())
      .def("close", &Communicator::close)
      .def("ll_dispatch", &Communicator::llDispatch, "phases, tokens, hidden, topk, pointers..., stream, trace=0",
           py::arg("phases"), py::arg("num_tokens"), py::arg("hidden"), py::arg("topk"), py::arg("x"),
           py::arg("topk_idx"), py::arg("topk_idx_bits"), py::arg("topk_weights"), py::arg("use_fp8"),
           py::arg("ue8m0"), py::arg("recv_x"), py::arg("recv_scales"), py::arg("expert_counts"),
           py::arg("send_slots"), py::arg("recv_rows"), py::arg("recv_weights"), py::arg("recv_slot_counts"),
           py::arg("stream"), py::arg("trace") = 0)
      .def("ll_combine", &Communicator::llCombine)
      .def("ht_dispatch", &Communicator::htDispatch)
      .def("ht_combine", &Communicator::htCombine)
      .def("ht_dispatch_cached", &Communicator::htDispatchCached)
      .def("reject", &Communicator::reject, py::arg("op"), py::arg("code"), py::arg("stream"))
      .def("ht_num_rows", &Communicator::htNumRows, py::arg("topk"), py::arg("layout"), py::arg("alignment"))
      .def("ht_max_row_bytes", &Communicator::htMaxRowBytes)
      .def("device_error", &Communicator::deviceError)
      .def_property_readonly("device_api_error", &Communicator::deviceApiError);
}
