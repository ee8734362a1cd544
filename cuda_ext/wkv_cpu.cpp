// WKV operator on the CPU: forward and backward of the SpikeGPT time-mix recurrence, with the
// per-channel arithmetic of wkv_core.h (the same functions the CUDA kernels call).
//
// Layout: k, v, y, log_den, gy, gk, gv are [B, T, C] contiguous; w, u are [C]; state is [B, 3, C]
// holding (a, b, p). Each (batch, channel) pair is an independent recurrence over T, so the work is
// split over batch x channel blocks; inside a block the channel loop is innermost and contiguous
// so the compiler vectorises it.
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
void summarize_forward(const S* w, const S* k, const S* v, S* summary, int64_t C, const Work& at, int64_t t0,
                       int64_t t1) {
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

// Outputs of tokens [t0, t1) from the state `start` ([3, C]); the state after them goes to `end`
// when it is not null.
template <typename S>
void forward_chunk(const S* w, const S* u, const S* k, const S* v, const S* start, S* y, S* log_den, S* end,
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
      wkv::forward_token(a[j], b[j], p[j], w[at.c0 + j], u[at.c0 + j], k[row + j], v[row + j], y[row + j],
                         log_den[row + j]);
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
template <typename S>
void summarize_backward(const S* w, const S* y, const S* log_den, const S* gy, S* summary, int64_t C,
                        const Work& at, int64_t t0, int64_t t1) {
  S ga[kChannelBlock], gb[kChannelBlock], ha[kChannelBlock], hb[kChannelBlock], gp[kChannelBlock];
  for (int64_t j = 0; j < at.n; ++j) {
    ga[j] = gb[j] = ha[j] = hb[j] = 0;
    gp[j] = wkv::kFreshExponent;
  }
  for (int64_t t = t1 - 1; t >= t0; --t) {
    const int64_t row = t * C + at.c0;
    for (int64_t j = 0; j < at.n; ++j) {
      wkv::retreat(ga[j], gb[j], ha[j], hb[j], gp[j], w[at.c0 + j], y[row + j], gy[row + j], log_den[row + j]);
    }
  }
  S* out[5] = {ga, gb, ha, hb, gp};
  for (int q = 0; q < 5; ++q) {
    for (int64_t j = 0; j < at.n; ++j) summary[q * C + at.c0 + j] = out[q][j];
  }
}

// Gradients of tokens [t0, t1) from the reverse state `entering` ([5, C], null for a fresh one);
// this chunk's parts of gw and gu go to gw_part and gu_part ([C]). The chunk that starts the
// sequence also adds gw's term of the initial state `state_in` ([3, C]).
template <typename S>
void backward_chunk(const S* w, const S* u, const S* k, const S* v, const S* y, const S* log_den, const S* gy,
                    const S* entering, const S* state_in, S* gk, S* gv, S* gw_part, S* gu_part, int64_t C,
                    const Work& at, int64_t t0, int64_t t1) {
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
      wkv::backward_token(ga[j], gb[j], ha[j], hb[j], gp[j], w[c], u[c], k[i], v[i], y[i], gy[i], log_den[i],
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
                  const torch::Tensor& v, const torch::Tensor& state) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), "wkv: k and v must both be [B, T, C]");
  TORCH_CHECK(k.size(1) > 0, "wkv: the sequence must hold at least one token");
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

std::vector<torch::Tensor> wkv_forward_cpu(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                           torch::Tensor state, int64_t chunk_len) {
  check_inputs(w, u, k, v, state);
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  const Chunks chunks(T, chunk_len);
  auto y = torch::empty_like(k), log_den = torch::empty_like(k), state_out = torch::empty_like(state);
  // with several chunks: first each chunk's summary, then (in place) the state entering it
  auto entering = torch::empty({chunks.count > 1 ? B * chunks.count : 0, 3, C}, state.options());
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv_forward_cpu", [&] {
    const scalar_t *w_ = w.data_ptr<scalar_t>(), *u_ = u.data_ptr<scalar_t>();
    const scalar_t *k_ = k.data_ptr<scalar_t>(), *v_ = v.data_ptr<scalar_t>(), *s_in = state.data_ptr<scalar_t>();
    scalar_t *y_ = y.data_ptr<scalar_t>(), *ld_ = log_den.data_ptr<scalar_t>(), *s_out = state_out.data_ptr<scalar_t>();
    if (chunks.count == 1) {
      parallel_over(B, C, 1, T, [&](const Work& at) {
        const int64_t seq = at.b * T * C, st = at.b * 3 * C;
        forward_chunk(w_, u_, k_ + seq, v_ + seq, s_in + st, y_ + seq, ld_ + seq, s_out + st, C, at, 0, T);
      });
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
      forward_chunk(w_, u_, k_ + seq, v_ + seq, slot(at.b, at.j), y_ + seq, ld_ + seq,
                    static_cast<scalar_t*>(nullptr), C, at, chunks.begin(at.j), chunks.end(at.j));
    });
  });
  return {y, log_den, state_out};
}

std::vector<torch::Tensor> wkv_backward_cpu(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                            torch::Tensor y, torch::Tensor log_den, torch::Tensor gy,
                                            torch::Tensor state, int64_t chunk_len) {
  check_inputs(w, u, k, v, state);
  TORCH_CHECK(y.sizes() == k.sizes() && log_den.sizes() == k.sizes() && gy.sizes() == k.sizes(),
              "wkv backward: y, log_den and gy must match k");
  gy = gy.contiguous();
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  const Chunks chunks(T, chunk_len);
  auto gk = torch::empty_like(k), gv = torch::empty_like(k);
  // one row of gw and gu per (batch, chunk); the caller sums them
  auto gw = torch::empty({B * chunks.count, C}, k.options()), gu = torch::empty_like(gw);
  auto entering = torch::empty({chunks.count > 1 ? B * chunks.count : 0, 5, C}, k.options());
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv_backward_cpu", [&] {
    const scalar_t *w_ = w.data_ptr<scalar_t>(), *u_ = u.data_ptr<scalar_t>();
    const scalar_t *k_ = k.data_ptr<scalar_t>(), *v_ = v.data_ptr<scalar_t>(), *y_ = y.data_ptr<scalar_t>();
    const scalar_t *ld_ = log_den.data_ptr<scalar_t>(), *gy_ = gy.data_ptr<scalar_t>();
    const scalar_t* s_in = state.data_ptr<scalar_t>();
    scalar_t *gk_ = gk.data_ptr<scalar_t>(), *gv_ = gv.data_ptr<scalar_t>();
    scalar_t *gw_ = gw.data_ptr<scalar_t>(), *gu_ = gu.data_ptr<scalar_t>();
    scalar_t* ent = chunks.count > 1 ? entering.data_ptr<scalar_t>() : nullptr;
    const auto slot = [&](int64_t b, int64_t j) { return ent + (b * chunks.count + j) * 5 * C; };
    if (chunks.count > 1) {
      parallel_over(B, C, chunks.count, chunks.len, [&](const Work& at) {
        const int64_t seq = at.b * T * C;
        summarize_backward(w_, y_ + seq, ld_ + seq, gy_ + seq, slot(at.b, at.j), C, at, chunks.begin(at.j),
                           chunks.end(at.j));
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
      backward_chunk(w_, u_, k_ + seq, v_ + seq, y_ + seq, ld_ + seq, gy_ + seq,
                     ent != nullptr ? static_cast<const scalar_t*>(slot(at.b, at.j)) : nullptr, s_in + at.b * 3 * C,
                     gk_ + seq, gv_ + seq, gw_ + part, gu_ + part, C, at, chunks.begin(at.j), chunks.end(at.j));
    });
  });
  return {gw, gu, gk, gv};
}
