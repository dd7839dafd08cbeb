// The outputs of one op call, allocated in C++ from shapes Python computed once per shape key
// (ncclep/outputs.py owns the shapes; this only allocates them).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/EmptyTensor.h>
#include <pybind11/pybind11.h>

#include <algorithm>
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
  // `shareFrom`: outputs from this index on that have one dtype are views of one allocation (each
  // dtype its own, so that torch.save can still write them); -1: every output its own allocation.
  // A torch custom op may not return outputs that share storage, so only the eager calls use it.
  explicit OutputPlan(const pybind11::list& specs, int shareFrom = -1) {
    for (const auto& item : specs) {
      if (item.is_none()) {
        specs_.emplace_back(std::nullopt);
        continue;
      }
      auto spec = item.cast<pybind11::tuple>();
      if (spec.size() != 2 && spec.size() != 3)
        throw pybind11::value_error("an output spec is (shape, dtype), (shape, dtype, strides) or None");
      Spec s{spec[0].cast<std::vector<int64_t>>(), spec[1].cast<at::ScalarType>(), {}};
      if (spec.size() == 3) {
        s.strides = spec[2].cast<std::vector<int64_t>>();
        for (int64_t d : s.shape)
          if (d < 0) throw pybind11::value_error("an output spec with strides has a fixed shape (no -1)");
      }
      specs_.emplace_back(std::move(s));
    }
    // Each output's allocation: its own (-1), or the index of the first output of its dtype from shareFrom on.
    shared_.assign(specs_.size(), -1);
    for (size_t i = shareFrom < 0 ? specs_.size() : size_t(shareFrom); i < specs_.size(); ++i) {
      if (!specs_[i]) continue;
      shared_[i] = int(i);
      for (size_t j = size_t(shareFrom); j < i; ++j)
        if (shared_[j] == int(j) && specs_[j]->dtype == specs_[i]->dtype) {
          shared_[i] = int(j);
          break;
        }
    }
    for (size_t i = 0; i < specs_.size(); ++i) {
      if (shared_[i] != int(i)) continue;
      size_t members = 0;
      for (size_t j = i; j < specs_.size(); ++j) members += shared_[j] == int(i);
      if (members == 1) shared_[i] = -1;  // alone: allocated as such
    }
  }

  size_t size() const { return specs_.size(); }

  // Undefined tensors where the spec is None (Python sees None). CUDA outputs come from the caching
  // allocator directly, not through the dispatcher's at::empty, and outputs that share an allocation
  // are views made here: an allocation costs ~5 µs on a slow host after an idle spell, a view a
  // fraction of one (bench/NOTES.md, sessions 12 and 19).
  std::vector<at::Tensor> allocate(int64_t tokens, const at::Device& device) const {
    std::vector<at::Tensor> out(specs_.size());
    std::vector<int64_t> shape;
    const bool cuda = device.is_cuda();
    for (size_t i = 0; i < specs_.size(); ++i) {
      const auto& spec = specs_[i];
      if (!spec || shared_[i] >= 0) continue;
      if (!spec->strides.empty()) {
        out[i] = cuda ? at::Tensor(at::detail::empty_strided_cuda(spec->shape, spec->strides, spec->dtype, device))
                      : at::empty_strided(spec->shape, spec->strides, cpuOptions(spec->dtype, device));
        continue;
      }
      shapeOf(*spec, tokens, shape);
      out[i] = cuda ? at::Tensor(at::detail::empty_cuda(shape, spec->dtype, device, std::nullopt))
                    : at::empty(shape, cpuOptions(spec->dtype, device));
    }
    for (size_t first = 0; first < specs_.size(); ++first)
      if (shared_[first] == int(first)) allocateShared(first, tokens, device, out);
    return out;
  }

 private:
  struct Spec {
    std::vector<int64_t> shape;
    at::ScalarType dtype;
    std::vector<int64_t> strides;  // empty: contiguous
  };
  std::vector<std::optional<Spec>> specs_;
  std::vector<int> shared_;  // per output: -1 (its own allocation) or the first output of its shared one

  // Each view starts 256-byte aligned (the allocation itself is 512-aligned on CUDA): more than the
  // kernels' 16-byte vector accesses and TMA's 16 bytes need.
  static constexpr size_t kAlign = 256;

  static void shapeOf(const Spec& spec, int64_t tokens, std::vector<int64_t>& shape) {
    shape = spec.shape;
    for (auto& d : shape)
      if (d == -1) d = tokens;
  }

  // The outputs whose allocation starts at `first`: one byte tensor, each output a view of its own
  // span (the storage is untyped; a view's offset counts its own elements).
  void allocateShared(size_t first, int64_t tokens, const at::Device& device, std::vector<at::Tensor>& out) const {
    std::vector<std::vector<int64_t>> shapes(specs_.size()), strides(specs_.size());
    std::vector<size_t> offsets(specs_.size());
    size_t bytes = 0;
    for (size_t i = first; i < specs_.size(); ++i) {
      if (shared_[i] != int(first)) continue;
      const Spec& spec = *specs_[i];
      const size_t item = c10::elementSize(spec.dtype);
      if (spec.strides.empty()) {
        shapeOf(spec, tokens, shapes[i]);
        strides[i].assign(shapes[i].size(), 1);
        for (size_t d = shapes[i].size(); d-- > 1;)
          strides[i][d - 1] = strides[i][d] * std::max<int64_t>(shapes[i][d], 1);
      } else {
        shapes[i] = spec.shape;
        strides[i] = spec.strides;
      }
      offsets[i] = bytes;
      bytes += (at::detail::computeStorageNbytes(shapes[i], strides[i], item) + kAlign - 1) / kAlign * kAlign;
    }
    const int64_t total = static_cast<int64_t>(bytes);
    at::Tensor base = device.is_cuda() ? at::Tensor(at::detail::empty_cuda({total}, at::kByte, device, std::nullopt))
                                       : at::empty({total}, cpuOptions(at::kByte, device));
    for (size_t i = first; i < specs_.size(); ++i) {
      if (shared_[i] != int(first)) continue;
      const at::ScalarType dtype = specs_[i]->dtype;
      at::Tensor view = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(base.storage()), base.key_set(),
                                                                 c10::scalarTypeToTypeMeta(dtype));
      view.unsafeGetTensorImpl()->set_sizes_and_strides(
          shapes[i], strides[i], static_cast<int64_t>(offsets[i] / c10::elementSize(dtype)));
      out[i] = std::move(view);
    }
  }

  static at::TensorOptions cpuOptions(at::ScalarType dtype, const at::Device& device) {
    return at::TensorOptions().dtype(dtype).device(device);
  }
};

inline const void* cptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
inline void* ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
inline const void* cptr(const std::optional<at::Tensor>& t) { return t ? cptr(*t) : nullptr; }

}  // namespace ncclep::python
