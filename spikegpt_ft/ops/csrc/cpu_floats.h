// Float32 values of small CPU tensors by loops of their own, and float32 scratch arrays, for the inference kernels
// (linear_cpu.cpp, decode_cpu.cpp, and the step entries of wkv_cpu.cpp and lif_cpu.cpp): at batch 1 an ATen
// conversion or contiguous() costs microseconds of dispatch, more than the copy of a row, and a decoding step has
// hundreds of them. bfloat16 widens exactly (it is the upper half of its float32), so these give the values ATen's
// conversion gives.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <memory>
#include <utility>
#include <vector>

namespace cpu_floats {

// std::vector's allocator, except that a plain resize or construction of n elements leaves them uninitialised:
// the kernels' scratch arrays are written in full right away, and zeroing them first would be one more pass over
// memory (at batch 64 of the 216M model, a large part of the step's time outside the products).
template <typename T>
struct UninitializedAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = UninitializedAllocator<U>;
  };
  UninitializedAllocator() = default;
  template <typename U>
  UninitializedAllocator(const UninitializedAllocator<U>&) noexcept {}
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;  // default-initialised: no value for a float
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

// A float32 scratch array that is not zeroed when made or grown.
using Floats = std::vector<float, UninitializedAllocator<float>>;

// `t` itself where it is contiguous (is_contiguous reads a flag; contiguous() is a dispatched op).
inline torch::Tensor contiguous(const torch::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

// The float32 values of `t`, row-major: bfloat16 and float32 by a loop, another dtype through ATen.
inline Floats floats_of(const torch::Tensor& t) {
  const auto c = contiguous(t);
  const int64_t n = c.numel();
  Floats out(n);
  if (c.scalar_type() == torch::kBFloat16) {
    const auto* src = c.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(src[i]);
  } else {
    const auto f = c.scalar_type() == torch::kFloat32 ? c : c.to(torch::kFloat32);
    std::copy_n(f.data_ptr<float>(), n, out.data());
  }
  return out;
}

}  // namespace cpu_floats
