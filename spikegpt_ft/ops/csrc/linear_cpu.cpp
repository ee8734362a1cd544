// Linear layer with bfloat16 weights for a few rows on the CPU: y = x W^T (+ bias), x and W bfloat16 [N, K],
// y bfloat16.
//
// Why hand-written: decoding one sequence reads every weight once per token, so a step should run at the
// speed of memory. PyTorch's CPU kernel for one row (oneDNN's bfloat16 product) reads the weights at 10 to
// 16 GB/s on the machines this project targets, while the same memory streams at about 50 GB/s; this loop
// reads them at about twice PyTorch's rate (BENCHMARKS.md). It is meant for one row (decoding one
// sequence); with several rows each weight row is reused from the cache, but PyTorch's matrix-matrix
// kernels are as fast from 3 rows on, so `spikegpt_ft.ops.Linear` calls this for 1 or 2 rows.
//
// Arithmetic: weights and inputs are widened to float32 exactly, the products summed in float32 (16 partial
// sums per row, then added up), the bias (float32 of its bfloat16) added, and the result rounded once to
// bfloat16: what PyTorch's kernel computes, up to the order of the float32 additions.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

#include "cpu_clones.h"

namespace {

// Partial sums per row: one AVX-512 register of float32.
constexpr int64_t kLanes = 16;
// Weights per thread below which a second thread costs more than it saves.
constexpr int64_t kMinWeightsPerThread = 1 << 16;

// bfloat16 bits to float32: the same bits in the upper half (exact).
inline float widen(uint16_t bf16) {
  const uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// The float32 dot product of one weight row `wn` (bfloat16 bits) with one row `xm` of x, both of length K.
inline float dot(const uint16_t* __restrict__ wn, const float* __restrict__ xm, int64_t K) {
  const int64_t body = K - K % kLanes;
  float acc[kLanes] = {};
  for (int64_t k = 0; k < body; k += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += widen(wn[k + j]) * xm[k + j];
  }
  float sum = 0.0f;
  for (int64_t j = 0; j < kLanes; ++j) sum += acc[j];
  for (int64_t k = body; k < K; ++k) sum += widen(wn[k]) * xm[k];
  return sum;
}

// out[m * N + n] for the weight rows [n0, n1) and every row m of x (float32, [M, K]); `bias` (float32, [N])
// may be null. Each weight row is read from memory once, then from the cache for the other rows of x.
CPU_CLONES void rows_times_weights(const float* __restrict__ x, const uint16_t* __restrict__ w,
                                   const float* __restrict__ bias, at::BFloat16* __restrict__ out, int64_t M,
                                   int64_t N, int64_t K, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) {
      float sum = dot(w + n * K, x + m * K, K);
      if (bias != nullptr) sum += bias[n];
      out[m * N + n] = at::BFloat16(sum);
    }
  }
}

}  // namespace

// x: [M, K] bfloat16 or float32; weight: [N, K] bfloat16; bias: [N]. Returns [M, N] bfloat16.
torch::Tensor small_batch_linear_cpu(torch::Tensor x, torch::Tensor weight, std::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "small_batch_linear: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "small_batch_linear: x must be [M, K] and weight [N, K]");
  TORCH_CHECK(weight.scalar_type() == torch::kBFloat16, "small_batch_linear: the weight must be bfloat16");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const auto xf = x.to(torch::kFloat32).contiguous();
  const auto w = weight.contiguous();
  const auto bf = bias ? bias->to(torch::kFloat32).contiguous() : torch::Tensor();
  TORCH_CHECK(!bias || bf.numel() == N, "small_batch_linear: the bias must have one value per output");
  auto out = torch::empty({M, N}, x.options().dtype(torch::kBFloat16));
  const auto* w_ = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const float* b_ = bias ? bf.data_ptr<float>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, kMinWeightsPerThread / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    rows_times_weights(xf.data_ptr<float>(), w_, b_, out.data_ptr<at::BFloat16>(), M, N, K, n0, n1);
  });
  return out;
}
