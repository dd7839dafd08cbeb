// ncclep._C.dispatch_layout: the outputs of get_dispatch_layout allocated and computed in one call,
// on torch's current stream of topk_idx's device (csrc/kernels/layout/dispatch_layout.cu).
//
// The three counts are views of one int32 tensor [R | N | E], so that one cudaMemsetAsync zeroes
// them: two allocations, a memset and one kernel in all.
#include "python/dispatch_layout.h"

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/layout/dispatch_layout.h"

namespace py = pybind11;

namespace ncclep::python {
namespace {

using Layout = std::tuple<at::Tensor, std::optional<at::Tensor>, at::Tensor, at::Tensor>;

void checkSizes(const at::Tensor& topkIdx, int numExperts, int worldSize, int numNodes) {
  if (!topkIdx.is_cuda()) throw py::value_error("dispatch_layout: topk_idx must be a CUDA tensor");
  if (topkIdx.dim() != 2)
    throw py::value_error("dispatch_layout: topk_idx must be [num_tokens, num_topk], got " +
                          std::to_string(topkIdx.dim()) + " dimensions");
  if (topkIdx.scalar_type() != at::kLong && topkIdx.scalar_type() != at::kInt)
    throw py::type_error(std::string("dispatch_layout: topk_idx must be int64 or int32, got ") +
                         c10::toString(topkIdx.scalar_type()));
  if (worldSize < 1 || worldSize > kDispatchLayoutMaxRanks)
    throw py::value_error("dispatch_layout: world_size must be in [1, " + std::to_string(kDispatchLayoutMaxRanks) +
                          "], got " + std::to_string(worldSize));
  if (numExperts < 1 || numExperts > kDispatchLayoutMaxExperts || numExperts % worldSize != 0)
    throw py::value_error("dispatch_layout: num_experts must be a multiple of world_size (" +
                          std::to_string(worldSize) + ") in [1, " + std::to_string(kDispatchLayoutMaxExperts) +
                          "], got " + std::to_string(numExperts));
  if (numNodes < 1 || worldSize % numNodes != 0)
    throw py::value_error("dispatch_layout: num_nodes must divide world_size (" + std::to_string(worldSize) +
                          "), got " + std::to_string(numNodes));
}

// (num_tokens_per_rank [R], num_tokens_per_rdma_rank [N] or None on one node, num_tokens_per_expert
// [E], is_token_in_rank [B, R] bool).
Layout dispatchLayout(const at::Tensor& topkIdx, int numExperts, int worldSize, int numNodes) {
  RECORD_FUNCTION("ncclep::dispatch_layout", std::vector<c10::IValue>());
  checkSizes(topkIdx, numExperts, worldSize, numNodes);
  const at::Tensor idx = topkIdx.contiguous();
  const c10::cuda::CUDAGuard onDevice(idx.device());
  const int64_t tokens = idx.size(0);
  const auto options = at::TensorOptions().device(idx.device());
  at::Tensor counts = at::empty({worldSize + numNodes + numExperts}, options.dtype(at::kInt));
  at::Tensor isTokenInRank = at::empty({tokens, worldSize}, options.dtype(at::kBool));

  DispatchLayoutParams p{};
  p.topkIdx = idx.data_ptr();
  p.topkIdx64 = idx.scalar_type() == at::kLong ? 1 : 0;
  p.numTokens = tokens;
  p.topk = static_cast<int>(idx.size(1));
  p.numExperts = numExperts;
  p.numRanks = worldSize;
  p.numNodes = numNodes;
  p.counts = counts.data_ptr<int32_t>();
  p.isTokenInRank = isTokenInRank.data_ptr<bool>();
  const cudaError_t err = launchDispatchLayout(p, c10::cuda::getCurrentCUDAStream(idx.device().index()).stream());
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("dispatch_layout: launch failed: ") + cudaGetErrorString(err));

  std::optional<at::Tensor> perNode;
  if (numNodes > 1) perNode = counts.narrow(0, worldSize, numNodes);
  return {counts.narrow(0, 0, worldSize), perNode, counts.narrow(0, worldSize + numNodes, numExperts),
          isTokenInRank};
}

}  // namespace

void bindDispatchLayout(py::module_& m) {
  m.attr("DISPATCH_LAYOUT_MAX_RANKS") = kDispatchLayoutMaxRanks;
  m.attr("DISPATCH_LAYOUT_MAX_EXPERTS") = kDispatchLayoutMaxExperts;
  m.def("dispatch_layout", &dispatchLayout, py::arg("topk_idx"), py::arg("num_experts"), py::arg("world_size"),
        py::arg("num_nodes"),
        "DeepEP's get_dispatch_layout: (num_tokens_per_rank, num_tokens_per_rdma_rank or None, "
        "num_tokens_per_expert, is_token_in_rank); ids outside [0, num_experts) are no choice, a "
        "repeated id counts once");
}

}  // namespace ncclep::python
