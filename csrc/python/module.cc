// ncclep._C: Python binding of the C API (csrc/include/ncclep.h).
// Errors raise RuntimeError carrying ncclepGetLastError()'s text.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

#include <nccl.h>

#include "ncclep.h"

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

namespace py = pybind11;

namespace {

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
    return d;
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
  m.attr("KERNEL_MODES") = py::tuple();  // modes with dispatch/combine kernels: none yet

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
      .def("check_lsa", &Communicator::checkLsa, py::arg("stream") = py::none())
      .def("close", &Communicator::close)
      .def_property_readonly("device_api_error", &Communicator::deviceApiError);
}
