// Multi-step LIF neuron on the CPU: forward and backward of SpikeGPT's spiking layer (hand-written
// because SpikingJelly has no compiled CPU kernel: its CPU path is a Python loop over time steps
// with several small torch ops per step).
//
// Neuron (docs/spikegpt-model.md, "LIF neurons"), per channel, from the membrane v0:
//   h_t = v_{t-1} + (x_t - (v_{t-1} - v_reset)) / tau        (decay_input = True)
//   s_t = 1 if h_t - v_threshold >= 0 else 0
//   v_t = s_t * v_reset + (1 - s_t) * h_t                     (hard reset, not detached)
// with the ATan surrogate  ds/dh = (alpha/2) / (1 + (pi/2 * alpha * (h - v_threshold))^2)  in the backward.
//
// Layout: x, spikes, h and their gradients are [T, *S] (T time steps; made contiguous, so read as [T, N] with
// N = numel(S) independent channels); v0, v_last and their gradients have the shape S of one time step.
// Outputs come in the shapes of the inputs. The work is split over blocks of channels; inside
// a block the time loop is sequential and the channel loop innermost and contiguous, so it vectorises.
//
// Bitwise reproducibility: every float32 operation below is the one SpikingJelly's CPU path does, in the
// same order, each rounded to float32 (scalars are cast to float32 first, as torch does for a float32
// tensor op with a Python number), so the spikes and the membrane are bitwise those of SpikingJelly. The
// backward follows the graph that torch's autograd builds over SpikingJelly's loop. The extension is
// built with -ffast-math, which would let GCC contract a*b+c into an FMA, turn /tau into *(1/tau) and
// reassociate sums; the pragma below switches that off for the functions of this file (it applies to
// functions defined after it, so the torch headers keep their flags). It keeps no-trapping-math, which
// changes no value (nothing here reads the floating-point exception flags) and lets GCC turn the spike's
// select into a vector compare, so the loops vectorise. tests/test_lif.py checks the bitwise equality.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "cpu_clones.h"
#include "cpu_floats.h"

#pragma GCC optimize("no-fast-math", "fp-contract=off", "no-trapping-math")

namespace {

// Most channels run together: their state (membrane or gradient carry) is a local array (16 KiB). Long
// contiguous rows matter: each time step reads and writes one row of every [T, N] array.
constexpr int64_t kBlock = 4096;
// Fewer (time step x channel) updates than this per thread are not worth a thread (waking one costs more).
constexpr int64_t kMinWorkPerThread = 1 << 15;

// Not std::isfinite: under the command line's -ffast-math that header function may fold to "true".
bool is_finite(double v) { return v >= -std::numeric_limits<double>::max() && v <= std::numeric_limits<double>::max(); }

struct Neuron {
  float tau, threshold, reset;
};

// The two loops below get AVX2 and AVX-512 clones (cpu_clones.h). The same IEEE operations run in each
// (no FMA: fp-contract is off), so the results do not depend on which clone runs.

// Run `body(c0, n)` over blocks of channels [c0, c0 + n): each thread takes one contiguous range of
// channels (when the work is large enough to need threads), cut into blocks of at most kBlock.
template <typename F>
void over_channel_blocks(int64_t T, int64_t N, const F& body) {
  const int64_t grain = std::max<int64_t>(16, kMinWorkPerThread / std::max<int64_t>(T, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c0 = begin; c0 < end; c0 += kBlock) body(c0, std::min(kBlock, end - c0));
  });
}

CPU_CLONES void forward_block(const float* __restrict__ x, const float* __restrict__ v0,
                              float* __restrict__ spikes, float* __restrict__ v_last, float* __restrict__ h,
                              int64_t T, int64_t N, int64_t c0, int64_t n, Neuron p) {
  float v[kBlock];
  for (int64_t j = 0; j < n; ++j) v[j] = v0[c0 + j];
  for (int64_t t = 0; t < T; ++t) {
    const int64_t row = t * N + c0;
    for (int64_t j = 0; j < n; ++j) {
      const float charged = v[j] + (x[row + j] - (v[j] - p.reset)) / p.tau;
      const float s = (charged - p.threshold) >= 0.0f ? 1.0f : 0.0f;
      h[row + j] = charged;
      spikes[row + j] = s;
      v[j] = s * p.reset + (1.0f - s) * charged;
    }
  }
  for (int64_t j = 0; j < n; ++j) v_last[c0 + j] = v[j];
}

// Reverse sweep. `carry` is dL/dv_t, the gradient reaching the membrane after step t: grad_v_last at
// the last step, then what step t+1 sends back through its charge (dh/dv = 1 - 1/tau).
CPU_CLONES void backward_block(const float* __restrict__ grad_spikes, const float* __restrict__ grad_v_last,
                               const float* __restrict__ h, float* __restrict__ grad_x,
                               float* __restrict__ grad_v0, int64_t T, int64_t N, int64_t c0, int64_t n, Neuron p,
                               float half_alpha, float atan_scale) {
  float carry[kBlock];
  for (int64_t j = 0; j < n; ++j) carry[j] = grad_v_last[c0 + j];
  for (int64_t t = T - 1; t >= 0; --t) {
    const int64_t row = t * N + c0;
    for (int64_t j = 0; j < n; ++j) {
      const float charged = h[row + j];
      const float z = charged - p.threshold;
      const float s = z >= 0.0f ? 1.0f : 0.0f;
      const float scaled = z * atan_scale;
      const float surrogate = (1.0f / (1.0f + scaled * scaled)) * half_alpha;
      const float gv = carry[j];
      // v_t = s*reset + (1-s)*h: ds gets -gv*h and gv*reset, dh gets gv*(1-s); s = H(h - threshold).
      // The terms of ds are summed in the order torch's autograd adds them up for SpikingJelly's graph.
      const float grad_spike = (grad_spikes[row + j] - gv * charged) + gv * p.reset;
      const float grad_h = grad_spike * surrogate + gv * (1.0f - s);
      const float gx = grad_h / p.tau;
      grad_x[row + j] = gx;
      carry[j] = grad_h - gx;
    }
  }
  for (int64_t j = 0; j < n; ++j) grad_v0[c0 + j] = carry[j];
}

Neuron neuron(double tau, double v_threshold, double v_reset) {
  TORCH_CHECK(is_finite(tau) && tau > 0, "lif: tau must be finite and positive, got ", tau);
  TORCH_CHECK(is_finite(v_threshold) && is_finite(v_reset), "lif: v_threshold and v_reset must be finite");
  return Neuron{static_cast<float>(tau), static_cast<float>(v_threshold), static_cast<float>(v_reset)};
}

void check_float_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.layout() == torch::kStrided,
              "lif (cpu): ", name, " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

// A sequence [T, *S] and a membrane (or its gradient) of shape S: checked, made contiguous, and N = numel(S).
int64_t check_shapes(torch::Tensor& seq, torch::Tensor& membrane, const char* seq_name, const char* membrane_name) {
  check_float_cpu(seq, seq_name);
  check_float_cpu(membrane, membrane_name);
  TORCH_CHECK(seq.dim() >= 2, "lif (cpu): ", seq_name, " must be [T, ...] with at least 2 dimensions, got ",
              seq.sizes());
  TORCH_CHECK(membrane.sizes() == seq.sizes().slice(1), "lif (cpu): ", membrane_name, " must have the shape ",
              seq.sizes().slice(1), " of one time step of ", seq_name, ", got ", membrane.sizes());
  seq = seq.contiguous();
  membrane = membrane.contiguous();
  return membrane.numel();
}

}  // namespace

std::vector<torch::Tensor> lif_forward_cpu(torch::Tensor x, torch::Tensor v0, double tau, double v_threshold,
                                           double v_reset) {
  const int64_t N = check_shapes(x, v0, "x", "v0"), T = x.size(0);
  const Neuron p = neuron(tau, v_threshold, v_reset);
  auto spikes = torch::empty_like(x), h = torch::empty_like(x), v_last = torch::empty_like(v0);
  const float* xp = x.data_ptr<float>();
  const float* v0p = v0.data_ptr<float>();
  float *sp = spikes.data_ptr<float>(), *hp = h.data_ptr<float>(), *vp = v_last.data_ptr<float>();
  over_channel_blocks(T, N, [&](int64_t c0, int64_t n) { forward_block(xp, v0p, sp, vp, hp, T, N, c0, n, p); });
  return {spikes, v_last, h};
}

// One time step of n channels from raw float32 arrays, for the recurrent step (decode_cpu.cpp), which holds
// its operands as arrays rather than tensors: the forward above with T = 1, through the same loop, so the
// spikes and the membrane are bitwise those of lif_forward_cpu.
void lif_step_cpu(const float* x, const float* v0, float* spikes, float* v_last, int64_t n, double tau,
                  double v_threshold, double v_reset) {
  const Neuron p = neuron(tau, v_threshold, v_reset);
  cpu_floats::Floats h(n);  // the charge, which only the backward needs
  over_channel_blocks(1, n, [&](int64_t c0, int64_t count) {
    forward_block(x, v0, spikes, v_last, h.data(), 1, n, c0, count, p);
  });
}

std::vector<torch::Tensor> lif_backward_cpu(torch::Tensor grad_spikes, torch::Tensor grad_v_last, torch::Tensor h,
                                            double tau, double v_threshold, double v_reset, double alpha) {
  const int64_t N = check_shapes(h, grad_v_last, "h", "grad_v_last"), T = h.size(0);
  check_float_cpu(grad_spikes, "grad_spikes");
  TORCH_CHECK(grad_spikes.sizes() == h.sizes(), "lif (cpu): grad_spikes ", grad_spikes.sizes(),
              " must have the shape of h ", h.sizes());
  grad_spikes = grad_spikes.contiguous();
  const Neuron p = neuron(tau, v_threshold, v_reset);
  TORCH_CHECK(is_finite(alpha) && alpha > 0, "lif: the surrogate's alpha must be finite and positive, got ", alpha);
  // The surrogate's constants, computed in double and then rounded, as torch does with Python numbers.
  const float half_alpha = static_cast<float>(alpha / 2), atan_scale = static_cast<float>(M_PI / 2 * alpha);
  auto grad_x = torch::empty_like(h), grad_v0 = torch::empty_like(grad_v_last);
  const float *gsp = grad_spikes.data_ptr<float>(), *gvp = grad_v_last.data_ptr<float>(), *hp = h.data_ptr<float>();
  float *gxp = grad_x.data_ptr<float>(), *gv0p = grad_v0.data_ptr<float>();
  over_channel_blocks(T, N, [&](int64_t c0, int64_t n) {
    backward_block(gsp, gvp, hp, gxp, gv0p, T, N, c0, n, p, half_alpha, atan_scale);
  });
  return {grad_x, grad_v0};
}
