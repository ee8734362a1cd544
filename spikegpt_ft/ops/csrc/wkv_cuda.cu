// The WKV operator's CUDA launchers (wkv_cuda.h): the kernels of wkv_cuda_kernels.cuh on the caller's
// stream, for float32, float16 or bfloat16 inputs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "wkv_cuda.h"
#include "wkv_cuda_kernels.cuh"

namespace {

using wkv_cuda::backward_kernel;
using wkv_cuda::forward_kernel;
using wkv_cuda::Launch;
using wkv_cuda::launch_for;

// Calls run(F{}) with F the element type of k and v.
template <typename Run>
void dispatch(WkvInput input, const Run& run) {
  switch (input) {
    case WkvInput::kFloat32: run(float{}); break;
    case WkvInput::kFloat16: run(__half{}); break;
    case WkvInput::kBFloat16: run(__nv_bfloat16{}); break;
  }
}

// The error of the launch just made (a block too large for the kernel's registers, say), or null.
const char* launch_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

int64_t wkv_cuda_chunk_len(int64_t B, int64_t T, int64_t C, int64_t requested) {
  return wkv_cuda::chunk_len_for(B, T, C, requested);
}

const char* wkv_forward_cuda(WkvInput input, int64_t B, int64_t T, int64_t C, int64_t chunk_len, const float* w,
                             const float* u, const void* k, const void* v, const void* r, const float* state_in,
                             float* y, float* log_den, float* out, float* state_out, void* stream) {
  if (B * T * C == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  const Launch at = launch_for(B, T, C, chunk_len);
  const auto run = [&](auto element) {
    using F = decltype(element);
    forward_kernel<F><<<at.grid, at.block, 0, s>>>(T, C, chunk_len, w, u, static_cast<const F*>(k),
                                                   static_cast<const F*>(v), static_cast<const F*>(r), state_in,
                                                   y, log_den, out, state_out);
  };
  dispatch(input, run);
  return launch_error();
}

const char* wkv_backward_cuda(WkvInput input, int64_t B, int64_t T, int64_t C, int64_t chunk_len, const float* w,
                              const float* u, const void* k, const void* v, const void* r, const float* y,
                              const float* log_den, const float* gout, const float* state_in, float* gw, float* gu,
                              float* gk, float* gv, float* gr, void* stream) {
  if (B * T * C == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  const Launch at = launch_for(B, T, C, chunk_len);
  const auto run = [&](auto element) {
    using F = decltype(element);
    backward_kernel<F><<<at.grid, at.block, 0, s>>>(T, C, chunk_len, w, u, static_cast<const F*>(k),
                                                    static_cast<const F*>(v), static_cast<const F*>(r), y,
                                                    log_den, gout, state_in, gw, gu, gk, gv, gr);
  };
  dispatch(input, run);
  return launch_error();
}
