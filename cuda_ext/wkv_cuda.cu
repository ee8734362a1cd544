// WKV operator on the GPU: the same recurrence and reverse sweep as wkv_cpu.cpp (see the
// comments there for the math), one thread per (batch, channel). Inputs may be float32,
// float16 or bfloat16; every accumulation is float32. Neighbouring threads own
// neighbouring channels, so each load and store of a token row is coalesced. The loop over
// tokens keeps no per-token scratch, so any sequence length works.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "wkv_cuda.h"

namespace {

constexpr int kThreads = 128;
constexpr float kNegHuge = -1e38f;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename F>
__global__ void forward_kernel(int64_t B, int64_t T, int64_t C, const float* __restrict__ w,
                               const float* __restrict__ u, const F* __restrict__ k,
                               const F* __restrict__ v, const float* __restrict__ state_in,
                               float* __restrict__ y, float* __restrict__ log_den,
                               float* __restrict__ state_out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * C) return;
  const int64_t bi = idx / C, c = idx % C;
  const float wc = w[c], uc = u[c];
  const int64_t st = bi * 3 * C + c;
  float a = state_in[st], b = state_in[st + C], p = state_in[st + 2 * C];
  for (int64_t t = 0, i = bi * T * C + c; t < T; ++t, i += C) {
    const float kt = to_float(k[i]), vt = to_float(v[i]);
    const float uk = uc + kt;
    float q = fmaxf(p, uk);
    float e1 = expf(p - q), e2 = expf(uk - q);
    const float den = e1 * b + e2;
    y[i] = (e1 * a + e2 * vt) / den;
    log_den[i] = q + logf(den);
    const float pw = p + wc;
    q = fmaxf(pw, kt);
    e1 = expf(pw - q);
    e2 = expf(kt - q);
    a = e1 * a + e2 * vt;
    b = e1 * b + e2;
    p = q;
  }
  state_out[st] = a;
  state_out[st + C] = b;
  state_out[st + 2 * C] = p;
}

template <typename F>
__global__ void backward_kernel(int64_t B, int64_t T, int64_t C, const float* __restrict__ w,
                                const float* __restrict__ u, const F* __restrict__ k,
                                const F* __restrict__ v, const float* __restrict__ y,
                                const float* __restrict__ log_den, const float* __restrict__ gy,
                                const float* __restrict__ state_in, float* __restrict__ gw,
                                float* __restrict__ gu, float* __restrict__ gk,
                                float* __restrict__ gv) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * C) return;
  const int64_t bi = idx / C, c = idx % C;
  const float wc = w[c], uc = u[c];
  float ga = 0.f, gb = 0.f, ha = 0.f, hb = 0.f, gp = kNegHuge, acc_w = 0.f, acc_u = 0.f;
  for (int64_t t = T - 1, i = bi * T * C + (T - 1) * C + c; t >= 0; --t, i -= C) {
    const float kt = to_float(k[i]), vt = to_float(v[i]), yt = y[i], gyt = gy[i], ld = log_den[i];
    const float ek = expf(kt + gp);
    const float direct = gyt * expf(uc + kt - ld);
    const float through_u = direct * (vt - yt);
    gk[i] = ek * (vt * ga + gb) + through_u;
    gv[i] = ek * ga + direct;
    acc_w += ek * (vt * ha + hb);
    acc_u += through_u;
    const float gp_new = fmaxf(gp + wc, -ld);
    const float s1 = expf(gp + wc - gp_new), s2 = expf(-ld - gp_new);
    ha = (ha + ga) * s1;
    hb = (hb + gb) * s1;
    ga = ga * s1 + gyt * s2;
    gb = gb * s1 - gyt * yt * s2;
    gp = gp_new;
  }
  const int64_t st = bi * 3 * C + c;
  gw[idx] = acc_w + expf(state_in[st + 2 * C] + gp) * (ha * state_in[st] + hb * state_in[st + C]);
  gu[idx] = acc_u;
}

int blocks_for(int64_t B, int64_t C) { return static_cast<int>((B * C + kThreads - 1) / kThreads); }

}  // namespace

void wkv_forward_cuda(WkvInput input, int64_t B, int64_t T, int64_t C, const float* w,
                      const float* u, const void* k, const void* v, const float* state_in,
                      float* y, float* log_den, float* state_out, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  const int grid = blocks_for(B, C);
  switch (input) {
    case WkvInput::kFloat32:
      forward_kernel<float><<<grid, kThreads, 0, s>>>(B, T, C, w, u, static_cast<const float*>(k),
                                                      static_cast<const float*>(v), state_in, y,
                                                      log_den, state_out);
      break;
    case WkvInput::kFloat16:
      forward_kernel<__half><<<grid, kThreads, 0, s>>>(B, T, C, w, u, static_cast<const __half*>(k),
                                                       static_cast<const __half*>(v), state_in, y,
                                                       log_den, state_out);
      break;
    case WkvInput::kBFloat16:
      forward_kernel<__nv_bfloat16><<<grid, kThreads, 0, s>>>(
          B, T, C, w, u, static_cast<const __nv_bfloat16*>(k), static_cast<const __nv_bfloat16*>(v),
          state_in, y, log_den, state_out);
      break;
  }
}

void wkv_backward_cuda(WkvInput input, int64_t B, int64_t T, int64_t C, const float* w,
                       const float* u, const void* k, const void* v, const float* y,
                       const float* log_den, const float* gy, const float* state_in, float* gw,
                       float* gu, float* gk, float* gv, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  const int grid = blocks_for(B, C);
  switch (input) {
    case WkvInput::kFloat32:
      backward_kernel<float><<<grid, kThreads, 0, s>>>(
          B, T, C, w, u, static_cast<const float*>(k), static_cast<const float*>(v), y, log_den, gy,
          state_in, gw, gu, gk, gv);
      break;
    case WkvInput::kFloat16:
      backward_kernel<__half><<<grid, kThreads, 0, s>>>(
          B, T, C, w, u, static_cast<const __half*>(k), static_cast<const __half*>(v), y, log_den,
          gy, state_in, gw, gu, gk, gv);
      break;
    case WkvInput::kBFloat16:
      backward_kernel<__nv_bfloat16><<<grid, kThreads, 0, s>>>(
          B, T, C, w, u, static_cast<const __nv_bfloat16*>(k), static_cast<const __nv_bfloat16*>(v),
          y, log_den, gy, state_in, gw, gu, gk, gv);
      break;
  }
}
