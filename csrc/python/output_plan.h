// The outputs of one op call, allocated in C++ from shapes Python computed once per shape key
// (ncclep/outputs.py owns the shapes; this only allocates them).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/EmptyTensor.h>
#include <c10/util/strides.h>
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
    // Outputs from shareFrom on that share a dtype form one allocation, led by the first of them;
    // an output alone of its dtype keeps its own allocation (-1).
    shared_.assign(specs_.size(), -1);
    for (size_t i = shareFrom < 0 ? specs_.size() : size_t(shareFrom); i < specs_.size(); ++i) {
      if (!specs_[i] || shared_[i] >= 0) continue;
      std::vector<size_t> members{i};
      for (size_t j = i + 1; j < specs_.size(); ++j)
        if (specs_[j] && shared_[j] < 0 && specs_[j]->dtype == specs_[i]->dtype) members.push_back(j);
      if (members.size() < 2) continue;
      for (size_t m : members) shared_[m] = int(i);
      groups_.push_back(std::move(members));
    }
  }

  size_t size() const { return specs_.size(); }

  // Undefined tensors where the spec is None (Python sees None). CUDA outputs come from the caching
  // allocator directly, not through the dispatcher's at::empty, and outputs that share an allocation
  // are views made here: an allocation costs ~5 µs on a slow host after an idle spell, a view a
  // fraction of one (bench/NOTES.md, sessions 12 and 19).
  std::vector<at::Tensor> allocate(int64_t tokens, const at::Device& device) const {
    std::vector<at::Tensor> out(specs_.size());
    c10::DimVector shape;
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
    for (const auto& members : groups_) allocateShared(members, tokens, device, out);
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
  std::vector<std::vector<size_t>> groups_;  // the outputs of each shared allocation, in order

  // Each view starts 256-byte aligned (the allocation itself is 512-aligned on CUDA): more than the
  // kernels' 16-byte vector accesses and TMA's 16 bytes need.
  static constexpr size_t kAlign = 256;

  static void shapeOf(const Spec& spec, int64_t tokens, c10::DimVector& shape) {
    shape.assign(spec.shape.begin(), spec.shape.end());
    for (auto& d : shape)
      if (d == -1) d = tokens;
  }

  // One shared allocation: one byte tensor, each member a view of its own span (the storage is
  // untyped; a view's offset counts its own elements).
  void allocateShared(const std::vector<size_t>& members, int64_t tokens, const at::Device& device,
                      std::vector<at::Tensor>& out) const {
    struct Span {
      c10::DimVector shape, strides;
      size_t offset;
    };
    c10::SmallVector<Span, 8> spans;
    size_t bytes = 0;
    for (size_t i : members) {
      const Spec& spec = *specs_[i];
      Span span;
      if (spec.strides.empty()) {
        shapeOf(spec, tokens, span.shape);
        span.strides = c10::contiguous_strides(span.shape);
      } else {
        span.shape.assign(spec.shape.begin(), spec.shape.end());
        span.strides.assign(spec.strides.begin(), spec.strides.end());
      }
      span.offset = bytes;
      const size_t nbytes = at::detail::computeStorageNbytes(span.shape, span.strides, c10::elementSize(spec.dtype));
      bytes += (nbytes + kAlign - 1) / kAlign * kAlign;
      spans.push_back(std::move(span));
    }
    const int64_t total = static_cast<int64_t>(bytes);
    at::Tensor base = device.is_cuda() ? at::Tensor(at::detail::empty_cuda({total}, at::kByte, device, std::nullopt))
                                       : at::empty({total}, cpuOptions(at::kByte, device));
    for (size_t m = 0; m < members.size(); ++m) {
      const at::ScalarType dtype = specs_[members[m]]->dtype;
      at::Tensor view = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(base.storage()), base.key_set(),
                                                                 c10::scalarTypeToTypeMeta(dtype));
      view.unsafeGetTensorImpl()->set_sizes_and_strides(
          spans[m].shape, spans[m].strides, static_cast<int64_t>(spans[m].offset / c10::elementSize(dtype)));
      out[members[m]] = std::move(view);
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
