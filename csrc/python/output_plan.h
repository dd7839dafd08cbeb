// The outputs of one op call, allocated in C++ from shapes Python computed once per shape key
// (ncclep/outputs.py owns the shapes; this only allocates them).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/EmptyTensor.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace ncclep::python {

// A list of (shape, dtype), (shape, dtype, strides) or None, in the order the op's outputs are
// returned. A dimension of -1 stands for the call's token count (the one size that changes from
// call to call); an output with strides has no such dimension.
class __attribute__((visibility("hidden"))) OutputPlan {
 public:
  explicit OutputPlan(const pybind11::list& specs) {
    for (const auto& item : specs) {
      if (item.is_none()) {
        specs_.emplace_back(std::nullopt);
        continue;
      }
      auto spec = item.cast<pybind11::tuple>();
      if (spec.size() != 2 && spec.size() != 3)
        throw pybind11::value_error("an output spec is (shape, dtype), (shape, dtype, strides) or None");
      Spec s{spec[0].cast<std::vector<int64_t>>(), spec[1].cast<at::ScalarType>(), {}};
      if (spec.size() == 3) s.strides = spec[2].cast<std::vector<int64_t>>();
      specs_.emplace_back(std::move(s));
    }
  }

  size_t size() const { return specs_.size(); }

  // Undefined tensors where the spec is None (Python sees None). CUDA outputs come from the caching
  // allocator directly, not through the dispatcher's at::empty: ~5 µs less for an LL dispatch's
  // seven outputs on a slow host (bench/NOTES.md, session 12).
  std::vector<at::Tensor> allocate(int64_t tokens, const at::Device& device) const {
    std::vector<at::Tensor> out;
    out.reserve(specs_.size());
    std::vector<int64_t> shape;
    const bool cuda = device.is_cuda();
    for (const auto& spec : specs_) {
      if (!spec) {
        out.emplace_back();
        continue;
      }
      if (!spec->strides.empty()) {
        out.push_back(cuda ? at::Tensor(at::detail::empty_strided_cuda(spec->shape, spec->strides, spec->dtype, device))
                           : at::empty_strided(spec->shape, spec->strides, cpuOptions(*spec, device)));
        continue;
      }
      shape = spec->shape;
      for (auto& d : shape)
        if (d == -1) d = tokens;
      out.push_back(cuda ? at::Tensor(at::detail::empty_cuda(shape, spec->dtype, device, std::nullopt))
                         : at::empty(shape, cpuOptions(*spec, device)));
    }
    return out;
  }

 private:
  struct Spec {
    std::vector<int64_t> shape;
    at::ScalarType dtype;
    std::vector<int64_t> strides;  // empty: contiguous
  };
  std::vector<std::optional<Spec>> specs_;

  static at::TensorOptions cpuOptions(const Spec& spec, const at::Device& device) {
    return at::TensorOptions().dtype(spec.dtype).device(device);
  }
};

inline const void* cptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
inline void* ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
inline const void* cptr(const std::optional<at::Tensor>& t) { return t ? cptr(*t) : nullptr; }

}  // namespace ncclep::python
