// WKV operator on the CPU: forward and backward of the SpikeGPT time-mix recurrence, with the
// per-channel arithmetic of wkv_core.h (the same functions the CUDA kernels call).
//
// Layout: k, v, r, y, log_den, out, gout, gk, gv, gr are [B, T, C] contiguous; w, u are [C]; state is
// [B, 3, C] holding (a, b, p). The receptance r is optional: with it the kernels also give the gated output
// out = sigmoid(r) y and take its gradient gout (see wkv_core.h); without it gout is the gradient of y.
// Each (batch, channel) pair is an independent recurrence over T, so the work is split over batch x
// channel blocks; inside a block the channel loop is innermost and contiguous so the compiler vectorises
// it (for AVX-512 and AVX2 too, see cpu_clones.h). Built with -ffast-math, those clones may differ from one another
// in the last bits (each has its own width of vector exp and log, and may order operations its own way; which of
// these it is was not traced): on the Intel Xeon of BENCHMARKS.md the AVX2 and the baseline loops' y, state and
// gradients were within 4.8e-7 of the x86-64-v4 (AVX-512) loops' (values of order 1), each within the tests' bounds
// (tests/test_cpu_loops.py runs the WKV tests on each).
//
// `chunk_len` cuts T into chunks that are run in parallel too (see wkv_core.h); 0 means one chunk,
// which is what the CPU wants (batch x channel blocks already outnumber its cores). Other values
// run the chunked scheme of the GPU kernels, so that the CPU tests check it.
//
// The backward pass needs no per-token scratch: the forward stores log_den = log of the
// denominator at each token, and the reverse sweep keeps its sums in the same "mantissa times
// exp(shared exponent)" form as the forward state, so nothing overflows.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu_clones.h"
#include "wkv_core.h"

namespace {

constexpr int64_t kChannelBlock = 16;

// Where a sequence of T tokens is cut: chunk j holds tokens [begin(j), end(j)).
struct Chunks {
  int64_t T, len, count;
  Chunks(int64_t T, int64_t chunk_len)
      : T(T), len(wkv::chunk_length(T, chunk_len)), count(wkv::chunk_count(T, len)) {}
  int64_t begin(int64_t j) const { return j * len; }
  int64_t end(int64_t j) const { return std::min(T, (j + 1) * len); }
};

// One unit of parallel work: batch row `b`, channels [c0, c0 + n), chunk `j`.
struct Work {
  int64_t b, c0, n, j;
};

// Below this many (token, channel) steps per thread, waking threads costs more than it saves (a
// decoding step of one token is a few microseconds of work), so small calls run on the caller's.
constexpr int64_t kStepsPerThread = 1 << 15;

// Runs body(work) for every (batch, channel block, chunk); `tokens` is the length of each unit's sweep.
template <typename F>
void parallel_over(int64_t B, int64_t C, int64_t chunks, int64_t tokens, const F& body) {
  const int64_t blocks = (C + kChannelBlock - 1) / kChannelBlock;
  const int64_t grain = std::max<int64_t>(1, kStepsPerThread / (kChannelBlock * std::max<int64_t>(tokens, 1)));
  at::parallel_for(0, B * blocks * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t j = i % chunks, blk = (i / chunks) % blocks, b = i / (chunks * blocks);
      const int64_t c0 = blk * kChannelBlock;
      body(Work{b, c0, std::min(kChannelBlock, C - c0), j});
    }
  });
}

// The chunk's own forward state from a fresh start, written to `summary` ([3, C]).
template <typename S>
CPU_CLONES void summarize_forward(const S* __restrict__ w, const S* __restrict__ k, const S* __restrict__ v,
                                  S* __restrict__ summary, int64_t C, const Work& at, int64_t t0, int64_t t1) {
  S a[kChannelBlock], b[kChannelBlock], p[kChannelBlock];
  for (int64_t j = 0; j < at.n; ++j) {
    a[j] = b[j] = 0;
    p[j] = wkv::kFreshExponent;
  }
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t row = t * C + at.c0;
    for (int64_t j = 0; j < at.n; ++j) wkv::advance(a[j], b[j], p[j], w[at.c0 + j], k[row + j], v[row + j]);
  }
  for (int64_t j = 0; j < at.n; ++j) {
    summary[at.c0 + j] = a[j];
    summary[C + at.c0 + j] = b[j];
    summary[2 * C + at.c0 + j] = p[j];
  }
}

// The gate is a compile-time choice (kGated: r and the gated arrays are given, else they are null), so
// that the inner loops below carry no branch and vectorise.

// Outputs of tokens [t0, t1) from the state `start` ([3, C]), and their gated outputs; the state after
// them goes to `end` when it is not null. kTrace: also store y and log_den, which only the backward reads (the
// recurrent step stores neither: y and log_den are null there).
template <bool kGated, typename S, bool kTrace = true>
CPU_CLONES void forward_chunk(const S* __restrict__ w, const S* __restrict__ u, const S* __restrict__ k,
                              const S* __restrict__ v, const S* __restrict__ r, const S* __restrict__ start,
                              S* __restrict__ y, S* __restrict__ log_den, S* __restrict__ out, S* __restrict__ end,
                              int64_t C, const Work& at, int64_t t0, int64_t t1) {
  S a[kChannelBlock], b[kChannelBlock], p[kChannelBlock];
  for (int64_t j = 0; j < at.n; ++j) {
    a[j] = start[at.c0 + j];
    b[j] = start[C + at.c0 + j];
    p[j] = start[2 * C + at.c0 + j];
  }
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t row = t * C + at.c0;
    for (int64_t j = 0; j < at.n; ++j) {
      const int64_t i = row + j;
      S yt, ld;
      wkv::forward_token(a[j], b[j], p[j], w[at.c0 + j], u[at.c0 + j], k[i], v[i], yt, ld);
      if constexpr (kTrace) {
        y[i] = yt;
        log_den[i] = ld;
      }
      if constexpr (kGated) out[i] = wkv::sigmoid_(r[i]) * yt;
    }
  }
  if (end == nullptr) return;
  for (int64_t j = 0; j < at.n; ++j) {
    end[at.c0 + j] = a[j];
    end[C + at.c0 + j] = b[j];
    end[2 * C + at.c0 + j] = p[j];
  }
}

// The chunk's own reverse state from a fresh start (nothing after it), written to `summary` ([5, C]).
template <bool kGated, typename S>
CPU_CLONES void summarize_backward(const S* __restrict__ w, const S* __restrict__ r, const S* __restrict__ y,
                                   const S* __restrict__ log_den, const S* __restrict__ gout,
                                   S* __restrict__ summary, int64_t C, const Work& at, int64_t t0, int64_t t1) {
  S ga[kChannelBlock], gb[kChannelBlock], ha[kChannelBlock], hb[kChannelBlock], gp[kChannelBlock];
  for (int64_t j = 0; j < at.n; ++j) {
    ga[j] = gb[j] = ha[j] = hb[j] = 0;
    gp[j] = wkv::kFreshExponent;
  }
  for (int64_t t = t1 - 1; t >= t0; --t) {
    const int64_t row = t * C + at.c0;
    for (int64_t j = 0; j < at.n; ++j) {
      const int64_t i = row + j;
      S gy = gout[i];
      if constexpr (kGated) gy = wkv::gate_grad_y(gout[i], r[i]);
      wkv::retreat(ga[j], gb[j], ha[j], hb[j], gp[j], w[at.c0 + j], y[i], gy, log_den[i]);
    }
  }
  S* out[5] = {ga, gb, ha, hb, gp};
  for (int q = 0; q < 5; ++q) {
    for (int64_t j = 0; j < at.n; ++j) summary[q * C + at.c0 + j] = out[q][j];
  }
}

// Gradients of tokens [t0, t1) from the reverse state `entering` ([5, C], null for a fresh one), r's
// included; this chunk's parts of gw and gu go to gw_part and gu_part ([C]). The chunk that starts the
// sequence also adds gw's term of the initial state `state_in` ([3, C]).
template <bool kGated, typename S>
CPU_CLONES void backward_chunk(const S* __restrict__ w, const S* __restrict__ u, const S* __restrict__ k,
                               const S* __restrict__ v, const S* __restrict__ r, const S* __restrict__ y,
                               const S* __restrict__ log_den, const S* __restrict__ gout,
                               const S* __restrict__ entering, const S* __restrict__ state_in, S* __restrict__ gk,
                               S* __restrict__ gv, S* __restrict__ gr, S* __restrict__ gw_part,
                               S* __restrict__ gu_part, int64_t C, const Work& at, int64_t t0, int64_t t1) {
  S ga[kChannelBlock], gb[kChannelBlock], ha[kChannelBlock], hb[kChannelBlock], gp[kChannelBlock];
  S acc_w[kChannelBlock], acc_u[kChannelBlock];
  S* carried[5] = {ga, gb, ha, hb, gp};
  for (int q = 0; q < 5; ++q) {
    for (int64_t j = 0; j < at.n; ++j) {
      carried[q][j] = entering != nullptr ? entering[q * C + at.c0 + j] : (q == 4 ? wkv::kFreshExponent : S(0));
    }
  }
  for (int64_t j = 0; j < at.n; ++j) acc_w[j] = acc_u[j] = 0;
  for (int64_t t = t1 - 1; t >= t0; --t) {
    const int64_t row = t * C + at.c0;
    for (int64_t j = 0; j < at.n; ++j) {
      const int64_t i = row + j, c = at.c0 + j;
      S gy = gout[i];
      if constexpr (kGated) {
        gy = wkv::gate_grad_y(gout[i], r[i]);
        gr[i] = wkv::gate_grad_r(gout[i], r[i], y[i]);
      }
      wkv::backward_token(ga[j], gb[j], ha[j], hb[j], gp[j], w[c], u[c], k[i], v[i], y[i], gy, log_den[i],
                          gk[i], gv[i], acc_w[j], acc_u[j]);
    }
  }
  for (int64_t j = 0; j < at.n; ++j) {
    const int64_t c = at.c0 + j;
    if (t0 == 0) {
      acc_w[j] += wkv::initial_state_grad_w(ha[j], hb[j], gp[j], state_in[c], state_in[C + c], state_in[2 * C + c]);
    }
    gw_part[c] = acc_w[j];
    gu_part[c] = acc_u[j];
  }
}

void check_inputs(const torch::Tensor& w, const torch::Tensor& u, const torch::Tensor& k,
                  const torch::Tensor& v, const std::optional<torch::Tensor>& r, const torch::Tensor& state) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), "wkv: k and v must both be [B, T, C]");
  TORCH_CHECK(!r || r->sizes() == k.sizes(), "wkv: the receptance r must be [B, T, C] like k");
  TORCH_CHECK(k.size(1) > 0, "wkv: the sequence must hold at least one token");
  const auto B = k.size(0), C = k.size(2);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == C && u.sizes() == w.sizes(), "wkv: w and u must be [C]");
  TORCH_CHECK(state.dim() == 3 && state.size(0) == B && state.size(1) == 3 && state.size(2) == C,
              "wkv: state must be [B, 3, C]");
  for (const auto* x : {&w, &u, &k, &v, &state, r ? &*r : &k}) {
    TORCH_CHECK(x->is_contiguous() && x->scalar_type() == k.scalar_type() && x->device().is_cpu(),
                "wkv (cpu): all inputs must be contiguous CPU tensors of one floating dtype");
  }
}

// A pointer to an optional tensor's data, null when it is absent.
template <typename S>
S* data_or_null(const std::optional<torch::Tensor>& x) {
  return x ? x->data_ptr<S>() : nullptr;
}

// Calls body(std::true_type{}) with a receptance, body(std::false_type{}) without.
template <typename F>
void with_gate(bool gated, const F& body) {
  if (gated) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

// `p + n`, or null for a null `p` (an optional array's row).
template <typename S>
S* offset(S* p, int64_t n) {
  return p != nullptr ? p + n : nullptr;
}

// Every sequence in one chunk (the whole of its T tokens): [B, T, C] arrays, the states [B, 3, C].
template <bool kGated, typename S, bool kTrace = true>
void forward_whole(const S* w, const S* u, const S* k, const S* v, const S* r, const S* state_in, S* y, S* log_den,
                   S* out, S* state_out, int64_t B, int64_t T, int64_t C) {
  parallel_over(B, C, 1, T, [&](const Work& at) {
    const int64_t seq = at.b * T * C, st = at.b * 3 * C;
    forward_chunk<kGated, S, kTrace>(w, u, k + seq, v + seq, offset(r, seq), state_in + st, offset(y, seq),
                                     offset(log_den, seq), offset(out, seq), state_out + st, C, at, 0, T);
  });
}

}  // namespace

// Returns (y, log_den, state_out, out): out is the gated output sigmoid(r) y, or y itself without r.
std::vector<torch::Tensor> wkv_forward_cpu(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                           std::optional<torch::Tensor> r, torch::Tensor state,
                                           int64_t chunk_len) {
  check_inputs(w, u, k, v, r, state);
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  const Chunks chunks(T, chunk_len);
  auto y = torch::empty_like(k), log_den = torch::empty_like(k), state_out = torch::empty_like(state);
  auto out = r ? torch::empty_like(k) : y;
  // with several chunks: first each chunk's summary, then (in place) the state entering it
  auto entering = torch::empty({chunks.count > 1 ? B * chunks.count : 0, 3, C}, state.options());
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv_forward_cpu", [&] { with_gate(r.has_value(), [&](auto gate) {
    constexpr bool kGated = decltype(gate)::value;
    const scalar_t *w_ = w.data_ptr<scalar_t>(), *u_ = u.data_ptr<scalar_t>();
    const scalar_t *k_ = k.data_ptr<scalar_t>(), *v_ = v.data_ptr<scalar_t>(), *s_in = state.data_ptr<scalar_t>();
    scalar_t *y_ = y.data_ptr<scalar_t>(), *ld_ = log_den.data_ptr<scalar_t>(), *s_out = state_out.data_ptr<scalar_t>();
    const scalar_t* r_ = data_or_null<scalar_t>(r);
    scalar_t* out_ = r ? out.data_ptr<scalar_t>() : nullptr;
    if (chunks.count == 1) {
      forward_whole<kGated>(w_, u_, k_, v_, r_, s_in, y_, ld_, out_, s_out, B, T, C);
      return;
    }
    scalar_t* ent = entering.data_ptr<scalar_t>();
    const auto slot = [&](int64_t b, int64_t j) { return ent + (b * chunks.count + j) * 3 * C; };
    parallel_over(B, C, chunks.count, chunks.len, [&](const Work& at) {
      const int64_t seq = at.b * T * C;
      summarize_forward(w_, k_ + seq, v_ + seq, slot(at.b, at.j), C, at, chunks.begin(at.j), chunks.end(at.j));
    });
    parallel_over(B, C, 1, chunks.count, [&](const Work& at) {
      for (int64_t j = 0; j < at.n; ++j) {
        const int64_t c = at.c0 + j;
        const scalar_t* s0 = s_in + at.b * 3 * C;
        scalar_t a = s0[c], b = s0[C + c], p = s0[2 * C + c];
        for (int64_t ch = 0; ch < chunks.count; ++ch) {
          scalar_t* here = slot(at.b, ch);
          const scalar_t la = here[c], lb = here[C + c], lp = here[2 * C + c];
          here[c] = a;
          here[C + c] = b;
          here[2 * C + c] = p;
          const scalar_t len = static_cast<scalar_t>(chunks.end(ch) - chunks.begin(ch));
          wkv::carry_over(a, b, p, w_[c], len, la, lb, lp);
        }
        scalar_t* s1 = s_out + at.b * 3 * C;
        s1[c] = a;
        s1[C + c] = b;
        s1[2 * C + c] = p;
      }
    });
    parallel_over(B, C, chunks.count, chunks.len, [&](const Work& at) {
      const int64_t seq = at.b * T * C;
      forward_chunk<kGated>(w_, u_, k_ + seq, v_ + seq, offset(r_, seq), slot(at.b, at.j), y_ + seq, ld_ + seq,
                            offset(out_, seq), static_cast<scalar_t*>(nullptr), C, at, chunks.begin(at.j),
                            chunks.end(at.j));
    });
  }); });
  return {y, log_den, state_out, out};
}

// One token per sequence from raw float32 arrays, for the recurrent step (decode_cpu.cpp), which holds its
// operands as arrays rather than tensors: w, u [C]; k, v, r [B, C]; the state [B, 3, C] before (state_in) and
// after (state_out); the gated output sigmoid(r) y into out [B, C]. The forward above with T = 1, through the
// same loop, so the results are bitwise those of wkv_forward_cpu; y and log_den, which only the backward reads,
// are neither stored nor allocated (on the Intel Xeon of BENCHMARKS.md the bf16 step of the 216M model at 64 rows
// took 34.7 - 38.2 ms so, median 35.8, against 34.7 - 38.4 ms, median 36.6, storing them: nine alternating pairs of
// processes, faster in eight; at batch 1 no difference).
void wkv_step_cpu(const float* w, const float* u, const float* k, const float* v, const float* r,
                  const float* state_in, float* state_out, float* out, int64_t B, int64_t C) {
  forward_whole<true, float, false>(w, u, k, v, r, state_in, nullptr, nullptr, out, state_out, B, 1, C);
}

// gout: the gradient of forward's `out`. Returns (gw, gu, gk, gv, gr); gr is empty without r.
std::vector<torch::Tensor> wkv_backward_cpu(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                            std::optional<torch::Tensor> r, torch::Tensor y, torch::Tensor log_den,
                                            torch::Tensor gout, torch::Tensor state, int64_t chunk_len) {
  check_inputs(w, u, k, v, r, state);  // y, log_den and gout were checked against k by the caller (ops.cpp)
  gout = gout.contiguous();
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  const Chunks chunks(T, chunk_len);
  auto gk = torch::empty_like(k), gv = torch::empty_like(k);
  auto gr = torch::empty({r ? B : 0, T, C}, k.options());
  // one row of gw and gu per (batch, chunk); the caller sums them
  auto gw = torch::empty({B * chunks.count, C}, k.options()), gu = torch::empty_like(gw);
  auto entering = torch::empty({chunks.count > 1 ? B * chunks.count : 0, 5, C}, k.options());
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv_backward_cpu", [&] { with_gate(r.has_value(), [&](auto gate) {
    constexpr bool kGated = decltype(gate)::value;
    const scalar_t *w_ = w.data_ptr<scalar_t>(), *u_ = u.data_ptr<scalar_t>();
    const scalar_t *k_ = k.data_ptr<scalar_t>(), *v_ = v.data_ptr<scalar_t>(), *y_ = y.data_ptr<scalar_t>();
    const scalar_t *ld_ = log_den.data_ptr<scalar_t>(), *go_ = gout.data_ptr<scalar_t>();
    const scalar_t *s_in = state.data_ptr<scalar_t>(), *r_ = data_or_null<scalar_t>(r);
    scalar_t *gk_ = gk.data_ptr<scalar_t>(), *gv_ = gv.data_ptr<scalar_t>();
    scalar_t* gr_ = r ? gr.data_ptr<scalar_t>() : nullptr;
    scalar_t *gw_ = gw.data_ptr<scalar_t>(), *gu_ = gu.data_ptr<scalar_t>();
    scalar_t* ent = chunks.count > 1 ? entering.data_ptr<scalar_t>() : nullptr;
    const auto slot = [&](int64_t b, int64_t j) { return ent + (b * chunks.count + j) * 5 * C; };
    if (chunks.count > 1) {
      parallel_over(B, C, chunks.count, chunks.len, [&](const Work& at) {
        const int64_t seq = at.b * T * C;
        summarize_backward<kGated>(w_, offset(r_, seq), y_ + seq, ld_ + seq, go_ + seq, slot(at.b, at.j), C, at,
                                   chunks.begin(at.j), chunks.end(at.j));
      });
      parallel_over(B, C, 1, chunks.count, [&](const Work& at) {
        for (int64_t j = 0; j < at.n; ++j) {
          const int64_t c = at.c0 + j;
          scalar_t ga = 0, gb = 0, ha = 0, hb = 0, gp = wkv::kFreshExponent;
          for (int64_t ch = chunks.count - 1; ch >= 0; --ch) {
            scalar_t* here = slot(at.b, ch);
            const scalar_t l[5] = {here[c], here[C + c], here[2 * C + c], here[3 * C + c], here[4 * C + c]};
            const scalar_t now[5] = {ga, gb, ha, hb, gp};
            for (int q = 0; q < 5; ++q) here[q * C + c] = now[q];
            const scalar_t len = static_cast<scalar_t>(chunks.end(ch) - chunks.begin(ch));
            wkv::carry_back(ga, gb, ha, hb, gp, w_[c], len, l[0], l[1], l[2], l[3], l[4]);
          }
        }
      });
    }
    parallel_over(B, C, chunks.count, chunks.len, [&](const Work& at) {
      const int64_t seq = at.b * T * C, part = (at.b * chunks.count + at.j) * C;
      backward_chunk<kGated>(w_, u_, k_ + seq, v_ + seq, offset(r_, seq), y_ + seq, ld_ + seq, go_ + seq,
                             ent != nullptr ? static_cast<const scalar_t*>(slot(at.b, at.j)) : nullptr,
                             s_in + at.b * 3 * C, gk_ + seq, gv_ + seq, offset(gr_, seq), gw_ + part, gu_ + part, C,
                             at, chunks.begin(at.j), chunks.end(at.j));
    });
  }); });
  return {gw, gu, gk, gv, gr};
}
