// WKV operator on the CPU: forward and backward of the SpikeGPT time-mix recurrence.
//
// Layout: k, v, y, log_den, gy, gk, gv are [B, T, C] contiguous; w, u are [C];
// state is [B, 3, C] holding (a, b, p) = (numerator, denominator, max exponent).
// Each (batch, channel) pair is an independent recurrence over T, so the work is split
// over batch x channel-blocks; inside a block the channel loop is innermost and
// contiguous so the compiler can vectorise it.
//
// The backward pass needs no per-token scratch: the forward stores log_den = log of the
// denominator at each token, and the reverse sweep keeps its adjoint sums in the same
// "mantissa times exp(shared exponent)" form as the forward state, so nothing overflows.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace {

constexpr int64_t kChannelBlock = 16;
constexpr double kNegHuge = -1e38;

template <typename scalar_t>
void forward_block(const scalar_t* w, const scalar_t* u, const scalar_t* k, const scalar_t* v,
                   const scalar_t* state_in, scalar_t* y, scalar_t* log_den, scalar_t* state_out,
                   int64_t T, int64_t C, int64_t c0, int64_t c1) {
  const int64_t n = c1 - c0;
  scalar_t a[kChannelBlock], b[kChannelBlock], p[kChannelBlock];
  for (int64_t j = 0; j < n; ++j) {
    a[j] = state_in[c0 + j];
    b[j] = state_in[C + c0 + j];
    p[j] = state_in[2 * C + c0 + j];
  }
  for (int64_t t = 0; t < T; ++t) {
    const int64_t row = t * C + c0;
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t kt = k[row + j], vt = v[row + j];
      const scalar_t uk = u[c0 + j] + kt;
      scalar_t q = std::max(p[j], uk);
      scalar_t e1 = std::exp(p[j] - q), e2 = std::exp(uk - q);
      const scalar_t den = e1 * b[j] + e2;
      y[row + j] = (e1 * a[j] + e2 * vt) / den;
      log_den[row + j] = q + std::log(den);
      const scalar_t pw = p[j] + w[c0 + j];
      q = std::max(pw, kt);
      e1 = std::exp(pw - q);
      e2 = std::exp(kt - q);
      a[j] = e1 * a[j] + e2 * vt;
      b[j] = e1 * b[j] + e2;
      p[j] = q;
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    state_out[c0 + j] = a[j];
    state_out[C + c0 + j] = b[j];
    state_out[2 * C + c0 + j] = p[j];
  }
}

// Reverse sweep. With G(t) = sum_{s>t} gy_s / D_s * e^{(s-1-t) w} (and its y-weighted twin)
// and H(t) = sum_{s>t} (s-1-t) gy_s / D_s * e^{(s-1-t) w}, the gradients are
//   gv_t = gy_t e^{u+k_t}/D_t + e^{k_t} Ga(t)
//   gk_t = gy_t e^{u+k_t}/D_t (v_t - y_t) + e^{k_t} (v_t Ga(t) + Gb(t))
//   gw   = sum_t e^{k_t} (v_t Ha(t) + Hb(t)) + (initial-state term)
// with G(t-1) = e^w G(t) + gy_t / D_t and H(t-1) = e^w (H(t) + G(t)).
template <typename scalar_t>
void backward_block(const scalar_t* w, const scalar_t* u, const scalar_t* k, const scalar_t* v,
                    const scalar_t* y, const scalar_t* log_den, const scalar_t* gy,
                    const scalar_t* state_in, scalar_t* gw, scalar_t* gu, scalar_t* gk,
                    scalar_t* gv, int64_t T, int64_t C, int64_t c0, int64_t c1) {
  const int64_t n = c1 - c0;
  scalar_t ga[kChannelBlock], gb[kChannelBlock], ha[kChannelBlock], hb[kChannelBlock],
      gp[kChannelBlock], acc_w[kChannelBlock], acc_u[kChannelBlock];
  for (int64_t j = 0; j < n; ++j) {
    ga[j] = gb[j] = ha[j] = hb[j] = acc_w[j] = acc_u[j] = 0;
    gp[j] = static_cast<scalar_t>(kNegHuge);
  }
  for (int64_t t = T - 1; t >= 0; --t) {
    const int64_t row = t * C + c0;
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t kt = k[row + j], vt = v[row + j], yt = y[row + j];
      const scalar_t gyt = gy[row + j], ld = log_den[row + j], wc = w[c0 + j];
      const scalar_t ek = std::exp(kt + gp[j]);
      const scalar_t direct = gyt * std::exp(u[c0 + j] + kt - ld);
      const scalar_t through_u = direct * (vt - yt);
      gk[row + j] = ek * (vt * ga[j] + gb[j]) + through_u;
      gv[row + j] = ek * ga[j] + direct;
      acc_w[j] += ek * (vt * ha[j] + hb[j]);
      acc_u[j] += through_u;
      const scalar_t gp_new = std::max(gp[j] + wc, -ld);
      const scalar_t s1 = std::exp(gp[j] + wc - gp_new), s2 = std::exp(-ld - gp_new);
      ha[j] = (ha[j] + ga[j]) * s1;
      hb[j] = (hb[j] + gb[j]) * s1;
      ga[j] = ga[j] * s1 + gyt * s2;
      gb[j] = gb[j] * s1 - gyt * yt * s2;
      gp[j] = gp_new;
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t a0 = state_in[c0 + j], b0 = state_in[C + c0 + j], p0 = state_in[2 * C + c0 + j];
    gw[c0 + j] = acc_w[j] + std::exp(p0 + gp[j]) * (ha[j] * a0 + hb[j] * b0);
    gu[c0 + j] = acc_u[j];
  }
}

void check_inputs(const torch::Tensor& w, const torch::Tensor& u, const torch::Tensor& k,
                  const torch::Tensor& v, const torch::Tensor& state) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), "wkv: k and v must both be [B, T, C]");
  const auto B = k.size(0), C = k.size(2);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == C && u.sizes() == w.sizes(), "wkv: w and u must be [C]");
  TORCH_CHECK(state.dim() == 3 && state.size(0) == B && state.size(1) == 3 && state.size(2) == C,
              "wkv: state must be [B, 3, C]");
  for (const auto* x : {&w, &u, &k, &v, &state}) {
    TORCH_CHECK(x->is_contiguous() && x->scalar_type() == k.scalar_type() && x->device().is_cpu(),
                "wkv (cpu): all inputs must be contiguous CPU tensors of one floating dtype");
  }
}

}  // namespace

std::vector<torch::Tensor> wkv_forward_cpu(torch::Tensor w, torch::Tensor u, torch::Tensor k,
                                           torch::Tensor v, torch::Tensor state) {
  check_inputs(w, u, k, v, state);
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  auto y = torch::empty_like(k), log_den = torch::empty_like(k), state_out = torch::empty_like(state);
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv_forward_cpu", [&] {
    at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t bi = i / blocks, c0 = (i % blocks) * kChannelBlock;
        const int64_t c1 = std::min(C, c0 + kChannelBlock);
        const int64_t seq = bi * T * C, st = bi * 3 * C;
        forward_block<scalar_t>(w.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(),
                                k.data_ptr<scalar_t>() + seq, v.data_ptr<scalar_t>() + seq,
                                state.data_ptr<scalar_t>() + st, y.data_ptr<scalar_t>() + seq,
                                log_den.data_ptr<scalar_t>() + seq,
                                state_out.data_ptr<scalar_t>() + st, T, C, c0, c1);
      }
    });
  });
  return {y, log_den, state_out};
}

std::vector<torch::Tensor> wkv_backward_cpu(torch::Tensor w, torch::Tensor u, torch::Tensor k,
                                            torch::Tensor v, torch::Tensor y, torch::Tensor log_den,
                                            torch::Tensor gy, torch::Tensor state) {
  check_inputs(w, u, k, v, state);
  TORCH_CHECK(y.sizes() == k.sizes() && log_den.sizes() == k.sizes() && gy.sizes() == k.sizes(),
              "wkv backward: y, log_den and gy must match k");
  gy = gy.contiguous();
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  auto gk = torch::empty_like(k), gv = torch::empty_like(k);
  auto gw = torch::empty({B, C}, k.options()), gu = torch::empty({B, C}, k.options());
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv_backward_cpu", [&] {
    at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t bi = i / blocks, c0 = (i % blocks) * kChannelBlock;
        const int64_t c1 = std::min(C, c0 + kChannelBlock);
        const int64_t seq = bi * T * C;
        backward_block<scalar_t>(
            w.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), k.data_ptr<scalar_t>() + seq,
            v.data_ptr<scalar_t>() + seq, y.data_ptr<scalar_t>() + seq,
            log_den.data_ptr<scalar_t>() + seq, gy.data_ptr<scalar_t>() + seq,
            state.data_ptr<scalar_t>() + bi * 3 * C, gw.data_ptr<scalar_t>() + bi * C,
            gu.data_ptr<scalar_t>() + bi * C, gk.data_ptr<scalar_t>() + seq,
            gv.data_ptr<scalar_t>() + seq, T, C, c0, c1);
      }
    });
  });
  return {gw, gu, gk, gv};
}
