// ncclep._C: Python binding of the C API (csrc/include/ncclep.h).
// Errors raise RuntimeError carrying ncclepGetLastError()'s text.
#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/cuda/CUDAStream.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nccl.h>

#include "common/device_error.h"
#include "ncclep.h"
#include "python/dispatch_layout.h"
#include "python/output_plan.h"

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

namespace py = pybind11;
using ncclep::python::cptr;
using ncclep::python::OutputPlan;
using ncclep::python::ptr;

namespace {

// The order of each op's outputs (exported as *_OUTPUTS name tuples; ncclep/outputs.py builds
// the plans in it).
enum LLDispatchOutput { LLD_X, LLD_SCALES, LLD_EXPERT_COUNTS, LLD_SEND_SLOTS, LLD_RECV_ROWS, LLD_RECV_WEIGHTS,
                        LLD_RECV_SLOT_COUNTS, kLLDispatchOutputs };
enum HTDispatchOutput { HTD_X, HTD_SCALES, HTD_TOPK_IDX, HTD_TOPK_WEIGHTS, HTD_NUM_RECV, HTD_EXPERT_COUNTS,
                        HTD_SEND_POS, HTD_RECV_SLOT, HTD_RECV_COUNTS, kHTDispatchOutputs };
enum HTCombineOutput { HTC_OUT, HTC_WEIGHTS, kHTCombineOutputs };

// ncclep._C.DeviceErrorPending, raised with the args (code, phase, peer, value).
PyObject* deviceErrorPending = nullptr;

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

// The *IdxBits of an int64 or int32 tensor of expert ids (Python checked the dtype).
int idxBits(const at::Tensor& idx) { return idx.scalar_type() == at::kLong ? 64 : 32; }

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

  // Adopts a group made elsewhere (ncclepLoopbackCreate).
  explicit Communicator(ncclepGroup_t group) : group_(group) {}

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

  // The op calls take tensors. Outputs come from an OutputPlan (shapes from ncclep/outputs.py),
  // or are passed back in for the receive half of a send_only call; kernels go on torch's current
  // stream of the input's device. Each returns its outputs in the order of the matching *_OUTPUTS
  // name tuple. An error a kernel recorded in an earlier call raises DeviceErrorPending(code,
  // phase, peer, value) before anything is launched (that read clears bad-input codes); the
  // receive half of a send_only call is launched regardless, as its peers expect it.
  std::vector<at::Tensor> llDispatch(const OutputPlan& plan, const at::Tensor& x, const at::Tensor& topkIdx,
                                     const at::Tensor& topkWeights, bool useFp8, bool ue8m0, int phases,
                                     const py::object& outputs, const std::optional<at::Tensor>& trace,
                                     bool pow2Scales) {
    RECORD_FUNCTION("ncclep::ll_dispatch", std::vector<c10::IValue>());
    std::lock_guard<std::mutex> lock(mu_);
    ncclepGroup_t g = openGroup();
    if (phases & NCCLEP_PHASE_SEND) raisePendingDeviceError(g);  // a receive half always follows its send
    std::vector<at::Tensor> o = takeOutputs(plan, outputs, x.size(0), x.device(), kLLDispatchOutputs);
    auto a = zeroedArgs<ncclepLLDispatchArgs_t>(NCCLEP_LL_ARGS_VERSION);
    a.phases = phases;
    a.numTokens = static_cast<int>(x.size(0));
    a.hidden = static_cast<int>(x.size(1));
    a.topk = static_cast<int>(topkIdx.size(1));
    a.x = cptr(x);
    a.topkIdx = cptr(topkIdx);
    a.topkIdxBits = idxBits(topkIdx);
    a.topkWeights = static_cast<const float*>(cptr(topkWeights));
    a.useFp8 = useFp8;
    a.ue8m0 = ue8m0;
    a.pow2Scales = pow2Scales;
    a.recvX = ptr(o[LLD_X]);
    a.recvScales = ptr(o[LLD_SCALES]);
    setScalesStrides(o[LLD_SCALES], a.recvScalesStrides);
    a.expertCounts = static_cast<int*>(ptr(o[LLD_EXPERT_COUNTS]));
    a.sendSlots = static_cast<int*>(ptr(o[LLD_SEND_SLOTS]));
    a.recvRows = static_cast<int*>(ptr(o[LLD_RECV_ROWS]));
    a.recvWeights = static_cast<float*>(ptr(o[LLD_RECV_WEIGHTS]));
    a.recvSlotCounts = static_cast<int*>(ptr(o[LLD_RECV_SLOT_COUNTS]));
    a.trace = static_cast<unsigned long long*>(trace ? ptr(*trace) : nullptr);
    check(ncclepLLDispatch(g, &a, currentStream(x)));
    return o;
  }

  // handle: the dispatch's send_slots, recv_rows, recv_weights, recv_slot_counts. topkWeights: [B, K]
  // fp32 weights given to the combine in place of the dispatch's (send half only).
  at::Tensor llCombine(const OutputPlan& plan, const at::Tensor& expertOut, const at::Tensor& sendSlots,
                       const at::Tensor& recvRows, const at::Tensor& recvWeights, const at::Tensor& recvSlotCounts,
                       int phases, std::optional<at::Tensor> out, const std::optional<at::Tensor>& topkWeights) {
    RECORD_FUNCTION("ncclep::ll_combine", std::vector<c10::IValue>());
    std::lock_guard<std::mutex> lock(mu_);
    ncclepGroup_t g = openGroup();
    if (phases & NCCLEP_PHASE_SEND) raisePendingDeviceError(g);
    const int64_t tokens = sendSlots.size(0);
    at::Tensor o = out ? std::move(*out) : plan.allocate(tokens, expertOut.device()).at(0);
    auto a = zeroedArgs<ncclepLLCombineArgs_t>(NCCLEP_LL_ARGS_VERSION);
    a.phases = phases;
    a.numTokens = static_cast<int>(tokens);
    a.hidden = static_cast<int>(expertOut.size(2));
    a.expertOut = cptr(expertOut);
    a.sendSlots = static_cast<const int*>(cptr(sendSlots));
    a.recvRows = static_cast<const int*>(cptr(recvRows));
    a.recvWeights = static_cast<const float*>(cptr(recvWeights));
    a.recvSlotCounts = static_cast<const int*>(cptr(recvSlotCounts));
    a.out = ptr(o);
    if (topkWeights) {
      a.topkWeights = static_cast<const float*>(cptr(topkWeights));
      a.topk = static_cast<int>(topkWeights->size(1));
    }
    check(ncclepLLCombine(g, &a, currentStream(expertOut)));
    return o;
  }

  std::vector<at::Tensor> htDispatch(const OutputPlan& plan, const at::Tensor& x,
                                     const std::optional<at::Tensor>& xScales, const at::Tensor& topkIdx,
                                     const std::optional<at::Tensor>& topkWeights, int layout, int alignment) {
    RECORD_FUNCTION("ncclep::ht_dispatch", std::vector<c10::IValue>());
    std::lock_guard<std::mutex> lock(mu_);
    ncclepGroup_t g = openGroup();
    raisePendingDeviceError(g);
    std::vector<at::Tensor> o = takeOutputs(plan, py::none(), x.size(0), x.device(), kHTDispatchOutputs);
    auto a = zeroedArgs<ncclepHTDispatchArgs_t>(NCCLEP_HT_ARGS_VERSION);
    a.phases = NCCLEP_PHASE_ALL;
    a.numTokens = static_cast<int>(x.size(0));
    a.hidden = static_cast<int>(x.size(1));
    a.topk = static_cast<int>(topkIdx.size(1));
    a.useFp8 = x.scalar_type() == at::kFloat8_e4m3fn;
    a.scaleBytes = xScales ? static_cast<int>(xScales->element_size()) : 0;
    a.x = cptr(x);
    a.xScales = cptr(xScales);
    a.topkIdx = cptr(topkIdx);
    a.topkIdxBits = idxBits(topkIdx);
    a.topkWeights = static_cast<const float*>(cptr(topkWeights));
    a.layout = layout;
    a.alignment = alignment;
    a.numRows = o[HTD_X].size(0);
    a.recvX = ptr(o[HTD_X]);
    a.recvScales = ptr(o[HTD_SCALES]);
    a.recvTopkIdx = ptr(o[HTD_TOPK_IDX]);
    a.recvTopkIdxBits = idxBits(o[HTD_TOPK_IDX]);
    a.recvTopkWeights = static_cast<float*>(ptr(o[HTD_TOPK_WEIGHTS]));
    a.numRecv = static_cast<int*>(ptr(o[HTD_NUM_RECV]));
    a.expertCounts = static_cast<int*>(ptr(o[HTD_EXPERT_COUNTS]));
    a.sendPos = static_cast<int*>(ptr(o[HTD_SEND_POS]));
    a.recvSlot = static_cast<int*>(ptr(o[HTD_RECV_SLOT]));
    a.recvCounts = static_cast<int*>(ptr(o[HTD_RECV_COUNTS]));
    check(ncclepHTDispatch(g, &a, currentStream(x)));
    return o;
  }

  // handle: the dispatch's send_pos, recv_slot, recv_counts, recv_topk_idx.
  std::vector<at::Tensor> htCombine(const OutputPlan& plan, const at::Tensor& x, const at::Tensor& sendPos,
                                    const at::Tensor& recvSlot, const at::Tensor& recvCounts,
                                    const at::Tensor& recvTopkIdx, const std::optional<at::Tensor>& topkWeights) {
    RECORD_FUNCTION("ncclep::ht_combine", std::vector<c10::IValue>());
    std::lock_guard<std::mutex> lock(mu_);
    ncclepGroup_t g = openGroup();
    raisePendingDeviceError(g);
    const int64_t tokens = sendPos.size(0);
    std::vector<at::Tensor> o = takeOutputs(plan, py::none(), tokens, x.device(), kHTCombineOutputs);
    auto a = zeroedArgs<ncclepHTCombineArgs_t>(NCCLEP_HT_ARGS_VERSION);
    a.phases = NCCLEP_PHASE_ALL;
    a.numTokens = static_cast<int>(tokens);
    a.hidden = static_cast<int>(x.size(1));
    a.topk = static_cast<int>(recvTopkIdx.size(1));
    a.numRows = x.size(0);
    a.x = cptr(x);
    a.topkWeights = static_cast<const float*>(cptr(topkWeights));
    a.sendPos = static_cast<const int*>(cptr(sendPos));
    a.recvSlot = static_cast<const int*>(cptr(recvSlot));
    a.recvCounts = static_cast<const int*>(cptr(recvCounts));
    a.recvTopkIdx = cptr(recvTopkIdx);
    a.recvTopkIdxBits = idxBits(recvTopkIdx);
    a.out = ptr(o[HTC_OUT]);
    a.outWeights = static_cast<float*>(ptr(o[HTC_WEIGHTS]));
    check(ncclepHTCombine(g, &a, currentStream(x)));
    return o;
  }

  // out: [numRows, ...] like x's rows; rowBytes: the bytes of one row of x.
  void htDispatchCached(const at::Tensor& x, const at::Tensor& sendPos, const at::Tensor& recvSlot,
                        const at::Tensor& out, int rowBytes) {
    RECORD_FUNCTION("ncclep::ht_dispatch_cached", std::vector<c10::IValue>());
    std::lock_guard<std::mutex> lock(mu_);
    ncclepGroup_t g = openGroup();
    raisePendingDeviceError(g);
    auto a = zeroedArgs<ncclepHTCachedDispatchArgs_t>(NCCLEP_HT_ARGS_VERSION);
    a.phases = NCCLEP_PHASE_ALL;
    a.numTokens = static_cast<int>(sendPos.size(0));
    a.rowBytes = rowBytes;
    a.numRows = out.size(0);
    a.x = cptr(x);
    a.sendPos = static_cast<const int*>(cptr(sendPos));
    a.recvSlot = static_cast<const int*>(cptr(recvSlot));
    a.out = ptr(out);
    check(ncclepHTCachedDispatch(g, &a, currentStream(x)));
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
    return readDeviceError(openGroup());
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

  static py::object readDeviceError(ncclepGroup_t g) {
    ncclepDeviceError_t e;
    check(ncclepGroupGetDeviceError(g, &e));
    if (e.code == ncclep::kDeviceOk) return py::none();
    return py::make_tuple(deviceErrorName(e.code), ncclepPhaseName(e.phase), e.peer, e.value);
  }

  static void raisePendingDeviceError(ncclepGroup_t g) {
    py::object err = readDeviceError(g);
    if (err.is_none()) return;
    PyErr_SetObject(deviceErrorPending, err.ptr());
    throw py::error_already_set();
  }

  // given: None (allocate from the plan) or the outputs of the call's send half (None for an
  // output the call does not have).
  static std::vector<at::Tensor> takeOutputs(const OutputPlan& plan, const py::object& given, int64_t tokens,
                                             const at::Device& device, size_t count) {
    if (plan.size() != count)
      throw py::value_error("output plan has " + std::to_string(plan.size()) + " entries, the call returns " +
                            std::to_string(count));
    if (given.is_none()) return plan.allocate(tokens, device);
    const auto list = given.cast<py::sequence>();
    if (list.size() != count)
      throw py::value_error("outputs has " + std::to_string(list.size()) + " entries, expected " +
                            std::to_string(count));
    std::vector<at::Tensor> out(count);
    for (size_t i = 0; i < count; ++i)
      if (!list[i].is_none()) out[i] = list[i].cast<at::Tensor>();
    return out;
  }

  // The LL dispatch's scales output as the C call takes it: dense (all zero), or the strides in
  // 4-byte words of a 4-byte-element tensor stored otherwise (e.g. column-major per expert).
  static void setScalesStrides(const at::Tensor& scales, long long (&strides)[3]) {
    if (!scales.defined() || scales.is_contiguous()) return;
    if (scales.dim() != 3 || scales.element_size() != 4)
      throw py::value_error("strided LL dispatch scales must be a 3-d tensor of 4-byte words");
    for (int i = 0; i < 3; ++i) strides[i] = scales.stride(i);
  }

  static cudaStream_t currentStream(const at::Tensor& t) {
    return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
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
  m.attr("LL_DISPATCH_OUTPUTS") = py::make_tuple("x", "scales", "expert_counts", "send_slots", "recv_rows",
                                                 "recv_weights", "recv_slot_counts");
  m.attr("LL_COMBINE_OUTPUTS") = py::make_tuple("out");
  m.attr("HT_DISPATCH_OUTPUTS") = py::make_tuple("x", "scales", "topk_idx", "topk_weights", "num_recv",
                                                 "expert_counts", "send_pos", "recv_slot", "recv_counts");
  m.attr("HT_COMBINE_OUTPUTS") = py::make_tuple("out", "weights");
  deviceErrorPending = PyErr_NewExceptionWithDoc(
      "ncclep._C.DeviceErrorPending",
      "A kernel of an earlier call recorded an error; args: (code, phase, peer, value). Nothing was launched.",
      PyExc_RuntimeError, nullptr);
  m.attr("DeviceErrorPending") = py::handle(deviceErrorPending);

  py::class_<OutputPlan>(m, "OutputPlan")
      .def(py::init<const py::list&, int>(), py::arg("specs"), py::arg("share_from") = -1,
           "(shape, dtype), (shape, dtype, strides) or None per output; -1 in a shape stands for the call's "
           "token count. share_from >= 0: the outputs from that index on that have one dtype are views of one "
           "allocation (eager calls only: a custom op's outputs may not share storage)")
      .def("__len__", &OutputPlan::size);

  ncclep::python::bindDispatchLayout(m);
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

  m.def(
      "loopback",
      [](int worldSize, int cudaDevice, int mode, int numExperts, int maxTokensPerRank, int hidden, int maxTopk,
         int numSms, double timeoutSeconds, int virtualNodes) {
        ncclepGroupConfig_t config = makeConfig(mode, numExperts, maxTokensPerRank, hidden, maxTopk, numSms,
                                                timeoutSeconds, 0, virtualNodes);
        std::vector<ncclepGroup_t> groups(size_t(std::max(worldSize, 1)), nullptr);
        check(ncclepLoopbackCreate(groups.data(), worldSize, cudaDevice, &config));
        std::vector<std::unique_ptr<Communicator>> owned;  // each group owned by exactly one thing
        size_t adopted = 0;
        try {
          owned.reserve(groups.size());
          for (; adopted < groups.size(); ++adopted) owned.emplace_back(new Communicator(groups[adopted]));
        } catch (...) {
          for (size_t i = adopted; i < groups.size(); ++i) ncclepGroupDestroy(groups[i]);
          throw;
        }
        py::list out;
        for (auto& c : owned) {
          py::object o = py::cast(c.get(), py::return_value_policy::take_ownership);
          c.release();
          out.append(o);
        }
        return out;
      },
      py::arg("world_size"), py::arg("cuda_device"), py::arg("mode"), py::arg("num_experts"),
      py::arg("max_tokens_per_rank"), py::arg("hidden"), py::arg("max_topk"), py::arg("num_sms"),
      py::arg("timeout_s"), py::arg("virtual_nodes") = 0,
      "every rank's Communicator of a group on one device, without NCCL (ncclepLoopbackCreate): for tests");

  py::class_<Communicator>(m, "Communicator")
      .def(py::init<const py::bytes&, int, int, int, int, int, int, int, int, int, double, size_t, int>(),
           py::arg("unique_id"), py::arg("world_size"), py::arg("rank"), py::arg("cuda_device"), py::arg("mode"),
           py::arg("num_experts"), py::arg("max_tokens_per_rank"), py::arg("hidden"), py::arg("max_topk"),
           py::arg("num_sms"), py::arg("timeout_s"), py::arg("window_bytes") = 0, py::arg("virtual_nodes") = 0)
      .def("info", &Communicator::info)
      .def("kernel_support", &Communicator::kernelSupport)
      .def("check_lsa", &Communicator::checkLsa, py::arg("stream") = py::none())
      .def("close", &Communicator::close)
      .def("ll_dispatch", &Communicator::llDispatch, py::arg("plan"), py::arg("x"), py::arg("topk_idx"),
           py::arg("topk_weights"), py::arg("use_fp8"), py::arg("ue8m0"), py::arg("phases"),
           py::arg("outputs") = py::none(), py::arg("trace") = py::none(), py::arg("pow2_scales") = false,
           "LL dispatch: returns the outputs in LL_DISPATCH_OUTPUTS order")
      .def("ll_combine", &Communicator::llCombine, py::arg("plan"), py::arg("expert_out"), py::arg("send_slots"),
           py::arg("recv_rows"), py::arg("recv_weights"), py::arg("recv_slot_counts"), py::arg("phases"),
           py::arg("out") = py::none(), py::arg("topk_weights") = py::none(), "LL combine: returns out [B, H]")
      .def("ht_dispatch", &Communicator::htDispatch, py::arg("plan"), py::arg("x"), py::arg("x_scales"),
           py::arg("topk_idx"), py::arg("topk_weights"), py::arg("layout"), py::arg("alignment"),
           "HT dispatch: returns the outputs in HT_DISPATCH_OUTPUTS order")
      .def("ht_combine", &Communicator::htCombine, py::arg("plan"), py::arg("x"), py::arg("send_pos"),
           py::arg("recv_slot"), py::arg("recv_counts"), py::arg("recv_topk_idx"), py::arg("topk_weights"),
           "HT combine: returns the outputs in HT_COMBINE_OUTPUTS order")
      .def("ht_dispatch_cached", &Communicator::htDispatchCached, py::arg("x"), py::arg("send_pos"),
           py::arg("recv_slot"), py::arg("out"), py::arg("row_bytes"))
      .def("reject", &Communicator::reject, py::arg("op"), py::arg("code"), py::arg("stream"))
      .def("ht_num_rows", &Communicator::htNumRows, py::arg("topk"), py::arg("layout"), py::arg("alignment"))
      .def("ht_max_row_bytes", &Communicator::htMaxRowBytes)
      .def("device_error", &Communicator::deviceError)
      .def_property_readonly("device_api_error", &Communicator::deviceApiError);
}
