// The WKV CUDA kernels and their launch geometry, with the per-channel arithmetic of wkv_core.h (the
// functions the CPU kernels call too, so the CPU tests check this math). wkv_cuda.cu launches them. The
// tests also compile this file for the CPU, running each block's threads as CPU threads
// (tests/cuda_emulation/), so that its indexing, shared memory and barrier are checked where no GPU is.
// Include it after the CUDA headers (dim3, cuda_fp16.h, cuda_bf16.h) or, on the CPU, after that stand-in.
//
// Parallelism. A plain kernel gives one thread to each (batch, channel) and walks all T tokens:
// only B*C threads, each with a long serial loop. Here the tokens are cut into chunks as well,
// one thread per (batch, channel, chunk): a block holds a group of neighbouring channels (threadIdx.x,
// so every load and store of a token row is coalesced) times all the chunks of the sequence
// (threadIdx.y). Each thread first runs its chunk from a fresh state (its summary, into shared
// memory), then folds the summaries of the chunks before it (after it, in the reverse sweep) into
// its true entering state, and runs its chunk again for the outputs. Inputs may be float32, float16
// or bfloat16; every accumulation is float32. No per-token scratch, so any sequence length works.
//
// Fused gate. Given the receptance r, the forward also writes the time mix's gated output
// sigmoid(r) y and the backward takes that output's gradient, giving r's gradient beside k's and v's:
// the elementwise work around the operator happens in its own pass over memory.
#pragma once

#include <algorithm>
#include <cstdint>

#include "wkv_core.h"

namespace wkv_cuda {

constexpr int kMaxChunks = 32;    // chunks per sequence: one block holds them all
constexpr int kMaxThreads = 1024;  // threads per block
// (batch, channel, chunk) threads wanted: enough to fill an H100-class GPU a few times over.
constexpr int64_t kTargetThreads = 1 << 17;
// the shortest chunk worth its summary pass
constexpr int64_t kMinChunkLen = 8;

__device__ __forceinline__ float to_float(float x) { return x; }
#ifdef __CUDACC__
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
#endif

// Block: blockDim.x channels x blockDim.y chunks; grid: (channel groups, B). `len`: tokens per chunk.
// r and out may be null (no gate).
template <typename F>
__global__ void __launch_bounds__(kMaxThreads)
    forward_kernel(int64_t T, int64_t C, int64_t len, const float* __restrict__ w, const float* __restrict__ u,
                   const F* __restrict__ k, const F* __restrict__ v, const F* __restrict__ r,
                   const float* __restrict__ state_in, float* __restrict__ y, float* __restrict__ log_den,
                   float* __restrict__ out, float* __restrict__ state_out) {
  __shared__ float summary[3][kMaxThreads];
  const int lane = threadIdx.x, j = threadIdx.y, chunks = blockDim.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + lane, bi = blockIdx.y;
  const bool active = c < C;
  const int64_t t0 = j * len, t1 = min(T, t0 + len);
  const int64_t seq = bi * T * C + c, st = bi * 3 * C + c;
  const float wc = active ? w[c] : 0.f, uc = active ? u[c] : 0.f;
  float a = 0.f, b = 0.f, p = wkv::kFreshExponent;
  if (active) {
    a = state_in[st];
    b = state_in[st + C];
    p = state_in[st + 2 * C];
  }
  if (chunks > 1) {
    float la = 0.f, lb = 0.f, lp = wkv::kFreshExponent;
    if (active) {
      for (int64_t t = t0, i = seq + t0 * C; t < t1; ++t, i += C) {
        wkv::advance(la, lb, lp, wc, to_float(k[i]), to_float(v[i]));
      }
    }
    const int slot = j * blockDim.x + lane;
    summary[0][slot] = la;
    summary[1][slot] = lb;
    summary[2][slot] = lp;
    __syncthreads();
    for (int i = 0; i < j; ++i) {  // every chunk before this one holds `len` tokens
      const int other = i * blockDim.x + lane;
      wkv::carry_over(a, b, p, wc, static_cast<float>(len), summary[0][other], summary[1][other],
                      summary[2][other]);
    }
    if (active && j == chunks - 1) {
      float fa = a, fb = b, fp = p;
      wkv::carry_over(fa, fb, fp, wc, static_cast<float>(t1 - t0), la, lb, lp);
      state_out[st] = fa;
      state_out[st + C] = fb;
      state_out[st + 2 * C] = fp;
    }
  }
  if (!active) return;
  for (int64_t t = t0, i = seq + t0 * C; t < t1; ++t, i += C) {
    float yt, ld;
    wkv::forward_token(a, b, p, wc, uc, to_float(k[i]), to_float(v[i]), yt, ld);
    y[i] = yt;
    log_den[i] = ld;
    if (r != nullptr) out[i] = wkv::sigmoid_(to_float(r[i])) * yt;
  }
  if (chunks == 1) {
    state_out[st] = a;
    state_out[st + C] = b;
    state_out[st + 2 * C] = p;
  }
}

// The gradient reaching y at element i: gout itself, or through the gate when there is one.
template <typename F>
__device__ __forceinline__ float grad_y(const float* __restrict__ gout, const F* __restrict__ r, int64_t i) {
  return r != nullptr ? wkv::gate_grad_y(gout[i], to_float(r[i])) : gout[i];
}

// Same layout as forward_kernel. gw and gu get one row per (batch, chunk): [B * chunks, C]. r and gr
// may be null (no gate).
template <typename F>
__global__ void __launch_bounds__(kMaxThreads)
    backward_kernel(int64_t T, int64_t C, int64_t len, const float* __restrict__ w, const float* __restrict__ u,
                    const F* __restrict__ k, const F* __restrict__ v, const F* __restrict__ r,
                    const float* __restrict__ y, const float* __restrict__ log_den, const float* __restrict__ gout,
                    const float* __restrict__ state_in, float* __restrict__ gw, float* __restrict__ gu,
                    float* __restrict__ gk, float* __restrict__ gv, float* __restrict__ gr) {
  __shared__ float summary[5][kMaxThreads];
  const int lane = threadIdx.x, j = threadIdx.y, chunks = blockDim.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + lane, bi = blockIdx.y;
  const bool active = c < C;
  const int64_t t0 = j * len, t1 = min(T, t0 + len);
  const int64_t seq = bi * T * C + c;
  const float wc = active ? w[c] : 0.f, uc = active ? u[c] : 0.f;
  float ga = 0.f, gb = 0.f, ha = 0.f, hb = 0.f, gp = wkv::kFreshExponent;
  if (chunks > 1) {
    float l[5] = {0.f, 0.f, 0.f, 0.f, wkv::kFreshExponent};
    if (active) {
      for (int64_t t = t1 - 1, i = seq + (t1 - 1) * C; t >= t0; --t, i -= C) {
        wkv::retreat(l[0], l[1], l[2], l[3], l[4], wc, y[i], grad_y(gout, r, i), log_den[i]);
      }
    }
    const int slot = j * blockDim.x + lane;
    for (int q = 0; q < 5; ++q) summary[q][slot] = l[q];
    __syncthreads();
    for (int i = chunks - 1; i > j; --i) {
      const int other = i * blockDim.x + lane;
      const float n = static_cast<float>(min(T, (i + 1) * len) - i * len);
      wkv::carry_back(ga, gb, ha, hb, gp, wc, n, summary[0][other], summary[1][other], summary[2][other],
                      summary[3][other], summary[4][other]);
    }
  }
  if (!active) return;
  float acc_w = 0.f, acc_u = 0.f;
  for (int64_t t = t1 - 1, i = seq + (t1 - 1) * C; t >= t0; --t, i -= C) {
    if (r != nullptr) gr[i] = wkv::gate_grad_r(gout[i], to_float(r[i]), y[i]);
    wkv::backward_token(ga, gb, ha, hb, gp, wc, uc, to_float(k[i]), to_float(v[i]), y[i], grad_y(gout, r, i),
                        log_den[i], gk[i], gv[i], acc_w, acc_u);
  }
  if (j == 0) {
    const int64_t st = bi * 3 * C + c;
    acc_w += wkv::initial_state_grad_w(ha, hb, gp, state_in[st], state_in[st + C], state_in[st + 2 * C]);
  }
  const int64_t part = (bi * chunks + j) * C + c;
  gw[part] = acc_w;
  gu[part] = acc_u;
}

struct Launch {
  dim3 grid, block;
};

// Channels per block: as many as fit beside the chunks, at least a warp.
inline Launch launch_for(int64_t B, int64_t T, int64_t C, int64_t len) {
  const int chunks = static_cast<int>(wkv::chunk_count(T, len));
  const int lanes = chunks <= 8 ? 128 : (chunks <= 16 ? 64 : 32);
  return {dim3(static_cast<unsigned>((C + lanes - 1) / lanes), static_cast<unsigned>(B)),
          dim3(static_cast<unsigned>(lanes), static_cast<unsigned>(chunks))};
}

// The chunk length used for a requested one (0: chosen to fill the GPU), at most kMaxChunks chunks.
inline int64_t chunk_len_for(int64_t B, int64_t T, int64_t C, int64_t requested) {
  int64_t len = requested;
  if (len <= 0) {
    const int64_t lanes = std::max<int64_t>(1, B * C);
    int64_t want = (kTargetThreads + lanes - 1) / lanes;
    want = std::max<int64_t>(1, std::min<int64_t>({want, T / kMinChunkLen, kMaxChunks}));
    len = (T + want - 1) / want;
  }
  len = wkv::chunk_length(T, len);
  if (wkv::chunk_count(T, len) > kMaxChunks) len = (T + kMaxChunks - 1) / kMaxChunks;
  return len;
}

}  // namespace wkv_cuda
