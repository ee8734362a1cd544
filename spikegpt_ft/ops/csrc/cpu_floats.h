// Float32 values of small CPU tensors by loops of their own, for the inference kernels (linear_cpu.cpp,
// decode_cpu.cpp): at batch 1 an ATen conversion or contiguous() costs microseconds of dispatch, more than the
// copy of a row, and a decoding step has hundreds of them. bfloat16 widens exactly (it is the upper half of its
// float32), so these give the values ATen's conversion gives.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <vector>

namespace cpu_floats {

// `t` itself where it is contiguous (is_contiguous reads a flag; contiguous() is a dispatched op).
inline torch::Tensor contiguous(const torch::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

// The float32 values of `t`, row-major, written to dst (t.numel() floats): bfloat16 and float32 by a loop,
// another dtype through ATen.
inline void write_floats(const torch::Tensor& t, float* dst) {
  const auto c = contiguous(t);
  const int64_t n = c.numel();
  if (c.scalar_type() == torch::kBFloat16) {
    const auto* src = c.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  } else {
    const auto f = c.scalar_type() == torch::kFloat32 ? c : c.to(torch::kFloat32);
    std::copy_n(f.data_ptr<float>(), n, dst);
  }
}

// The float32 values of `t`, row-major.
inline std::vector<float> floats_of(const torch::Tensor& t) {
  std::vector<float> out(t.numel());
  write_floats(t, out.data());
  return out;
}

}  // namespace cpu_floats
