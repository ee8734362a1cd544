// The arithmetic of the WKV operator, one channel at a time, shared by the CPU kernels (wkv_cpu.cpp)
// and the CUDA kernels (wkv_cuda.cu): both call these functions, so the CPU tests check the GPU's math.
//
// Forward. The state (a, b, p) stands for numerator a e^p and denominator b e^p of
//   wkv_t = (sum_{i<t} e^{(t-1-i) w + k_i} v_i + e^{u+k_t} v_t) / (sum_{i<t} e^{(t-1-i) w + k_i} + e^{u+k_t}),
// p being a shared exponent that keeps a and b in range. Fresh: a = b = 0, p = -1e38.
//
// Reverse. With D_t the denominator at token t, the reverse sweep carries, scaled by e^{gp},
//   G(t) = sum_{s>t} e^{(s-1-t) w} gy_s / D_s         (ga; gb is the same with -gy_s y_s)
//   H(t) = sum_{s>t} (s-1-t) e^{(s-1-t) w} gy_s / D_s  (ha, hb likewise)
// and the gradients are
//   gv_t = gy_t e^{u+k_t} / D_t + e^{k_t} Ga(t)
//   gk_t = gy_t e^{u+k_t} / D_t (v_t - y_t) + e^{k_t} (v_t Ga(t) + Gb(t))
//   gu   = sum_t gy_t e^{u+k_t} / D_t (v_t - y_t)
//   gw   = sum_t e^{k_t} (v_t Ha(t) + Hb(t)) + e^{p_0} (Ha(-1) a_0 + Hb(-1) b_0)
// with G(t-1) = e^w G(t) + gy_t / D_t and H(t-1) = e^w (H(t) + G(t)).
//
// Receptance gate. The time mix multiplies the WKV output by sigmoid(r); the kernels can do that too, so
// the gated output comes out of the same pass (and its gradients out of the reverse one):
//   out_t = sigmoid(r_t) y_t,   gy_t = gout_t sigmoid(r_t),   gr_t = gout_t y_t sigmoid(r_t) (1 - sigmoid(r_t)).
//
// Chunks. Both sweeps are linear in their state, so a sequence cut into chunks can be run chunk by
// chunk in parallel: first each chunk's own contribution from a fresh state (its "summary"), then
// the state entering every chunk by folding the summaries before it (carry_over / carry_back), then
// each chunk again from its true entering state. Over L tokens the forward state decays by e^{L w};
// the reverse state maps (G, H) to e^{L w} (G, H + L G).
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define WKV_FN __host__ __device__ __forceinline__
#else
#define WKV_FN inline
#endif

namespace wkv {

// p of a fresh state: "minus infinity" that stays finite under addition.
constexpr float kFreshExponent = -1e38f;

WKV_FN float exp_(float x) { return expf(x); }
WKV_FN double exp_(double x) { return exp(x); }
WKV_FN float log_(float x) { return logf(x); }
WKV_FN double log_(double x) { return log(x); }
template <typename S>
WKV_FN S max_(S x, S y) { return x > y ? x : y; }

// The logistic sigmoid, in a form whose exp never overflows (the kernels are built to assume no inf).
template <typename S>
WKV_FN S sigmoid_(S x) {
  const S e = exp_(-max_(x, -x)), s = S(1) / (S(1) + e);  // e = exp(-|x|) <= 1
  return x >= S(0) ? s : e * s;
}

// The gradient reaching the WKV output y_t from the gradient gout of the gated output sigmoid(r) y.
template <typename S>
WKV_FN S gate_grad_y(S gout, S r) { return gout * sigmoid_(r); }

// The gradient reaching the receptance r_t from the gradient gout of the gated output.
template <typename S>
WKV_FN S gate_grad_r(S gout, S r, S y) {
  const S s = sigmoid_(r);
  return gout * y * s * (S(1) - s);
}

// The chunk length used for a requested one: 0, or T and more, mean one chunk of all T tokens.
WKV_FN int64_t chunk_length(int64_t T, int64_t requested) { return requested <= 0 || requested >= T ? T : requested; }
// How many chunks of `len` tokens (the last may be shorter) cover T tokens.
WKV_FN int64_t chunk_count(int64_t T, int64_t len) { return (T + len - 1) / len; }

// The forward state advanced by one token (k, v).
template <typename S>
WKV_FN void advance(S& a, S& b, S& p, S w, S k, S v) {
  const S pw = p + w, q = max_(pw, k);
  const S e1 = exp_(pw - q), e2 = exp_(k - q);
  a = e1 * a + e2 * v;
  b = e1 * b + e2;
  p = q;
}

// One token of the forward pass: its output y and log D_t, then the state advanced past it.
template <typename S>
WKV_FN void forward_token(S& a, S& b, S& p, S w, S u, S k, S v, S& y, S& log_den) {
  const S uk = u + k, q = max_(p, uk);
  const S e1 = exp_(p - q), e2 = exp_(uk - q);
  const S den = e1 * b + e2;
  y = (e1 * a + e2 * v) / den;
  log_den = q + log_(den);
  advance(a, b, p, w, k, v);
}

// The state (a, b, p) carried over `len` tokens whose own summary (from a fresh state) is (la, lb, lp).
template <typename S>
WKV_FN void carry_over(S& a, S& b, S& p, S w, S len, S la, S lb, S lp) {
  const S pw = p + len * w, q = max_(pw, lp);
  const S e1 = exp_(pw - q), e2 = exp_(lp - q);
  a = e1 * a + e2 * la;
  b = e1 * b + e2 * lb;
  p = q;
}

// The reverse state moved back over token t (its output y, gradient gy and log D_t).
template <typename S>
WKV_FN void retreat(S& ga, S& gb, S& ha, S& hb, S& gp, S w, S y, S gy, S log_den) {
  const S gp_new = max_(gp + w, -log_den);
  const S s1 = exp_(gp + w - gp_new), s2 = exp_(-log_den - gp_new);
  ha = (ha + ga) * s1;
  hb = (hb + gb) * s1;
  ga = ga * s1 + gy * s2;
  gb = gb * s1 - gy * y * s2;
  gp = gp_new;
}

// One token of the reverse sweep: gk_t, gv_t, its terms of gw and gu, then the state moved past it.
template <typename S>
WKV_FN void backward_token(S& ga, S& gb, S& ha, S& hb, S& gp, S w, S u, S k, S v, S y, S gy, S log_den,
                           S& gk, S& gv, S& acc_w, S& acc_u) {
  const S ek = exp_(k + gp);
  const S direct = gy * exp_(u + k - log_den);
  const S through_u = direct * (v - y);
  gk = ek * (v * ga + gb) + through_u;
  gv = ek * ga + direct;
  acc_w += ek * (v * ha + hb);
  acc_u += through_u;
  retreat(ga, gb, ha, hb, gp, w, y, gy, log_den);
}

// The reverse state carried back over `len` tokens whose own summary is (lga, lgb, lha, lhb, lgp).
template <typename S>
WKV_FN void carry_back(S& ga, S& gb, S& ha, S& hb, S& gp, S w, S len, S lga, S lgb, S lha, S lhb, S lgp) {
  const S gpw = gp + len * w, q = max_(gpw, lgp);
  const S s1 = exp_(gpw - q), s2 = exp_(lgp - q);
  ha = (ha + len * ga) * s1 + lha * s2;
  hb = (hb + len * gb) * s1 + lhb * s2;
  ga = ga * s1 + lga * s2;
  gb = gb * s1 + lgb * s2;
  gp = q;
}

// gw's term from the state (a0, b0, p0) the sequence started from, given the reverse state at its start.
template <typename S>
WKV_FN S initial_state_grad_w(S ha, S hb, S gp, S a0, S b0, S p0) {
  return exp_(p0 + gp) * (ha * a0 + hb * b0);
}

}  // namespace wkv
