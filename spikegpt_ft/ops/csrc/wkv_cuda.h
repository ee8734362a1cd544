// Launchers for the WKV CUDA kernels. Plain pointers and sizes only, so this header (and
// wkv_cuda.cu) compile with nvcc alone, without the PyTorch headers.
#pragma once
#include <cstdint>

// Element type of k and v; the recurrence itself always runs in float32.
enum class WkvInput : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The chunk length the kernels will use for a requested one (0: chosen to fill the GPU). The
// launchers must be given this value; the backward's gw and gu have one row per (batch, chunk).
int64_t wkv_cuda_chunk_len(int64_t B, int64_t T, int64_t C, int64_t requested);

// k, v and the optional receptance r (null: no gate): [B, T, C] of `input`; w, u: [C] float;
// state_in/state_out: [B, 3, C] float; y, log_den and, with r, out = sigmoid(r) y: [B, T, C] float.
// `stream` is a cudaStream_t. The launchers return null, or the CUDA error of the launch; nothing is
// launched for an empty batch.
const char* wkv_forward_cuda(WkvInput input, int64_t B, int64_t T, int64_t C, int64_t chunk_len, const float* w,
                             const float* u, const void* k, const void* v, const void* r, const float* state_in,
                             float* y, float* log_den, float* out, float* state_out, void* stream);

// gout (the gradient of forward's out, or of y without r): [B, T, C] float; writes gw, gu: [B * chunks, C]
// and gk, gv and, with r, gr: [B, T, C], all float.
const char* wkv_backward_cuda(WkvInput input, int64_t B, int64_t T, int64_t C, int64_t chunk_len, const float* w,
                              const float* u, const void* k, const void* v, const void* r, const float* y,
                              const float* log_den, const float* gout, const float* state_in, float* gw, float* gu,
                              float* gk, float* gv, float* gr, void* stream);
