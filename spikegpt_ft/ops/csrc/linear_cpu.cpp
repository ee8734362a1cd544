// Linear products for decoding on the CPU with bfloat16 or int8 weights: y = x W^T (+ bias).
//
// Why hand-written: decoding reads every weight once per token, so a step should run at the speed of
// memory. PyTorch's CPU kernels for a few rows read bfloat16 weights at well under that speed, and on CPUs
// without bfloat16 arithmetic (AVX2, AVX-512 without AVX512-BF16) its bfloat16 matrix product is emulated
// at a quarter of the float32 rate (BENCHMARKS.md).
//
// `stream_linear`: each weight is read from memory once and multiplied with up to four rows of x from
// registers, in float32 accumulators; with more rows, a block of weight rows read once serves every group of
// four rows from the cache. An AVX-512 version (16 lanes: half the instructions per weight of AVX2, which is what
// limits int8 weights and four rows), an AVX2+FMA one and a portable one; the best the CPU runs is chosen at run
// time, and `spikegpt_ft.ops.linear` chooses where the streaming kernel runs at all. On CPUs with AVX512-VNNI,
// int8 weights by bfloat16 rows are multiplied in integers instead ("avx512-vnni", int8_digits.h): exact sums, by
// VNNI for up to four rows and by AMX-INT8 (amx_linear.cpp), where the CPU has it, for more. On CPUs with
// AVX512-BF16 as well, bfloat16 weights by bfloat16 rows go through VDPBF16PS ("avx512-bf16", `Avx512Bf16`).
//
// Where the weights come from memory (up to four rows of x), both vector kernels read one weight row at a time
// (the AVX-512 one two neighbouring rows for int8 weights and one row of x: `Avx512`), so that the weights arrive
// as one sequential stream, with a software prefetch ahead of it (`Prefetch`: how far ahead and into which cache
// is measured on the machine itself, once per process). Where they come from the cache (more rows), the AVX-512
// kernel takes 4 to 8 weight rows at a time, so that they share each vector of x. bfloat16 weights are widened by a
// shift (the even elements) and a mask (the odd ones), against x laid out the same way once per call.
// - The AVX2 kernel (16 weights a step, two sums per output): on an AMD EPYC with AVX2 (2 cores) one row went
//   from 1.53 - 1.67 x to 0.99 - 1.00 x the time of a 64-bit-word `max` over the weights in bf16 and from 2.35 -
//   2.37 x to 1.49 - 1.62 x in int8, against several rows at a time; at 64 rows, where the products are
//   compute-bound, bf16 became 7 - 9 % slower and int8 stayed the same. 1 KiB and 2 - 8 KiB of prefetch into the
//   L1 cache ran alike there.
// - The AVX-512 kernel (a cache line a step, one sum per output): on an Intel Xeon with AVX-512 (2 cores) one row
//   went from 1.39 - 1.40 x to 1.14 - 1.16 x the time of reading the weights (the bench's read, memory_cpu.cpp) in
//   bf16 and from 1.88 - 1.92 x to 1.57 - 1.59 x in int8, against 8 rows at a time, a 16-weight step and 1 KiB of
//   prefetch; at 64 rows it runs as before (scratch comparisons of the products alone, BENCHMARKS.md). Two or
//   four sums per output were no faster at one row and 1.2 - 1.6 x slower at 64 rows, where they leave fewer
//   registers for the rows sharing x.
//
// Arithmetic: weights and inputs widened to float32 exactly, products summed in float32 (the same order for
// an output whatever the number of rows), int8 sums times the row's scale, the bias (float32 of its stored
// value) added, the result rounded once to the input's dtype. That is what PyTorch's kernels compute, up to
// the order of the float32 additions. The integer kernels: see int8_digits.h.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_floats.h"
#include "int8_digits.h"
#include "prefetch.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_X86_KERNELS 1
#define AVX2_TARGET __attribute__((target("avx2,fma")))
#define AVX512_TARGET __attribute__((target("avx512f,fma")))
#endif

namespace {

using cpu_floats::contiguous;
using cpu_floats::floats_of;

// Weights per thread below which a second thread costs more than it saves.
constexpr int64_t kMinWeightsPerThread = 1 << 16;
// Rows of x the streaming kernel multiplies at once (their accumulators live in registers).
constexpr int64_t kMaxStreamRows = 4;

// How the vector kernels ask for the weights ahead of the ones they multiply, where those come from memory
// (prefetch.h: the candidates, of which each process measures the fastest, `calibrate_prefetch`).
using software_prefetch::kPrefetches;
using software_prefetch::Prefetch;

// Weights per block that the rows of x share from the cache (256 KiB of bfloat16).
constexpr int64_t kStreamBlockWeights = 1 << 17;

inline float widen(uint16_t bf16) {
  const uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float widen(int8_t q) { return static_cast<float>(q); }

// What every streaming kernel needs: x float32 [M, K] (for the vector kernels with bfloat16 weights, each 16-
// (AVX2) or 32-wide (AVX-512) block of the reduction as its even then its odd elements: `float_rows`), the
// weight's raw elements [N, K], the per-row scale (int8) or null, the bias float32 or null, out [M, N] of type
// Out; rows [n0, n1) of the weight. `prefetch`: how the vector kernels prefetch the weights where this pass over
// them is their only one (they come from memory); null where they come from the cache (a prefetch would not help).
template <typename W, typename Out>
struct StreamArgs {
  const float* x;
  const W* w;
  const float* scale;
  const float* bias;
  Out* out;
  int64_t M, N, K;
  const Prefetch* prefetch;
  // bfloat16 weights by bfloat16 rows on AVX512-BF16 (`Avx512Bf16`): x's own rows [M, K], else null
  const uint16_t* x_bf16 = nullptr;
  // int8 weights by bfloat16 rows on AVX512-VNNI (`Avx512Vnni`): x as digits (int8_digits.h), else null
  const int8_t* digits = nullptr;
  const double* units = nullptr;
  const int64_t* sums = nullptr;
  int64_t digit_stride = 0;
};

template <typename W, typename Out>
inline void store(const StreamArgs<W, Out>& a, int64_t m, int64_t n, float sum) {
  if (a.scale != nullptr) sum *= a.scale[n];
  if (a.bias != nullptr) sum += a.bias[n];
  a.out[m * a.N + n] = static_cast<Out>(sum);
}

// Portable: one weight row at a time, 16 partial sums per row of x (vectorised by the compiler).
template <typename W, typename Out>
void stream_portable(const StreamArgs<W, Out>& a, int64_t n0, int64_t n1) {
  constexpr int64_t lanes = 16;
  const int64_t K = a.K, body = K - K % lanes;
  for (int64_t n = n0; n < n1; ++n) {
    const W* wn = a.w + n * K;
    for (int64_t m = 0; m < a.M; ++m) {
      const float* xm = a.x + m * K;
      float acc[lanes] = {};
      for (int64_t k = 0; k < body; k += lanes) {
        for (int64_t j = 0; j < lanes; ++j) acc[j] += widen(wn[k + j]) * xm[k + j];
      }
      float sum = 0.0f;
      for (int64_t j = 0; j < lanes; ++j) sum += acc[j];
      for (int64_t k = body; k < K; ++k) sum += widen(wn[k]) * xm[k];
      store(a, m, n, sum);
    }
  }
}

#ifdef HAVE_X86_KERNELS
// Sixteen weights as two vectors of float32, in the order x is laid out for them: bfloat16 as its even and its
// odd elements (a bfloat16 is the upper half of its float32), int8 as its first and its last eight.
AVX2_TARGET inline void widen16(const uint16_t* p, __m256& first, __m256& second) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  first = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
  second = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
AVX2_TARGET inline void widen16(const int8_t* p, __m256& first, __m256& second) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  first = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
  second = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(raw, raw)));
}
AVX2_TARGET inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// R weight rows from n times M rows of x: two accumulators of 8 lanes for each of the R * M outputs.
template <int M, int R, typename W, typename Out>
AVX2_TARGET void stream_rows_avx2(const StreamArgs<W, Out>& a, int64_t n) {
  constexpr int64_t kLine = 64 / sizeof(W);  // weights per cache line
  const int64_t K = a.K, body = K - K % 16;
  __m256 acc[R][M][2];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m][0] = acc[r][m][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < body; k += 16) {
    for (int r = 0; r < R; ++r) {
      const W* wk = a.w + (n + r) * K + k;
      if (a.prefetch != nullptr && k % kLine == 0) software_prefetch::ahead(*a.prefetch, wk);
      __m256 first, second;
      widen16(wk, first, second);
      for (int m = 0; m < M; ++m) {
        acc[r][m][0] = _mm256_fmadd_ps(first, _mm256_loadu_ps(a.x + m * K + k), acc[r][m][0]);
        acc[r][m][1] = _mm256_fmadd_ps(second, _mm256_loadu_ps(a.x + m * K + k + 8), acc[r][m][1]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const W* wn = a.w + (n + r) * K;
    for (int m = 0; m < M; ++m) {
      float sum = hsum(_mm256_add_ps(acc[r][m][0], acc[r][m][1]));
      for (int64_t k = body; k < K; ++k) sum += widen(wn[k]) * a.x[m * K + k];
      store(a, m, n + r, sum);
    }
  }
}

// The AVX2 kernel: one weight row at a time, for one sequential stream (two at a time took 1.15 x as long on
// one row on the EPYC of the comment at the top, in a scratch comparison).
struct Avx2 {
  template <int M>
  static constexpr int kWeightRows = 1;
  template <int M, typename W>
  static constexpr int kMemoryRows = 1;
  template <int M, int R, typename W, typename Out>
  static void rows(const StreamArgs<W, Out>& a, int64_t n) { stream_rows_avx2<M, R>(a, n); }
};

// Vector v (of 16 weights, as float32) of the cache line at p, in the order x is laid out for it: bfloat16 (32
// weights a line) its even (v = 0) or odd (v = 1) elements, the upper halves of 32-bit words, by a shift or a
// mask (x's 32-wide blocks deinterleaved by float_rows); int8 (64 a line) its quarter v.
AVX512_TARGET inline __m512 line_vector(const uint16_t* p, int v) {
  const __m512i raw = _mm512_loadu_si512(p);
  return _mm512_castsi512_ps(v == 0 ? _mm512_slli_epi32(raw, 16)
                                    : _mm512_and_si512(raw, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}
AVX512_TARGET inline __m512 line_vector(const int8_t* p, int v) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * v))));
}

// R weight rows from n by M rows of x, a cache line of weights at a time: one sum per output, the line's vectors
// added to it in order (the same order for an output whatever R and M).
template <int M, int R, typename W, typename Out>
AVX512_TARGET void stream_rows_avx512(const StreamArgs<W, Out>& a, int64_t n) {
  constexpr int kVectors = 64 / sizeof(W) / 16;
  constexpr int64_t kLine = 64 / sizeof(W);  // weights per cache line
  const int64_t K = a.K, body = K - K % kLine;
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < body; k += kLine) {
    if (a.prefetch != nullptr) {
      for (int r = 0; r < R; ++r) software_prefetch::ahead(*a.prefetch, a.w + (n + r) * K + k);
    }
    for (int v = 0; v < kVectors; ++v) {
      __m512 xs[M];
      for (int m = 0; m < M; ++m) xs[m] = _mm512_loadu_ps(a.x + m * K + k + 16 * v);
      for (int r = 0; r < R; ++r) {
        const __m512 wv = line_vector(a.w + (n + r) * K + k, v);
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xs[m], acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const W* wn = a.w + (n + r) * K;
    for (int m = 0; m < M; ++m) {
      float sum = _mm512_reduce_add_ps(acc[r][m]);
      for (int64_t k = body; k < K; ++k) sum += widen(wn[k]) * a.x[m * K + k];
      store(a, m, n + r, sum);
    }
  }
}

// The AVX-512 kernel: 4 to 8 weight rows at a time where they come from the cache, so that 8 to 16 sums share
// each vector of x. Where they come from memory, int8 weights by one row of x go two neighbouring rows at a time:
// an output's sum is a chain of dependent additions, four a cache line of int8, which alone held the product
// below the speed of memory; two rows make two chains and stay one stream. On the Intel Xeon of BENCHMARKS.md the
// 216M model's int8 products of one row took 1.32 - 1.49 x the read with two rows, 1.41 - 1.58 x with one (four
// alternating scratch sets), and its step 8.94 - 9.07 ms against 9.18 - 9.33 ms (three); bfloat16 (two additions
// a line) ran alike either way and stays at one.
struct Avx512 {
  template <int M>
  static constexpr int kWeightRows = M == 1 ? 8 : 4;
  template <int M, typename W>
  static constexpr int kMemoryRows = M == 1 && sizeof(W) == 1 ? 2 : 1;
  template <int M, int R, typename W, typename Out>
  static void rows(const StreamArgs<W, Out>& a, int64_t n) { stream_rows_avx512<M, R>(a, n); }
};

// int8 weights by bfloat16 rows on CPUs with AVX512-VNNI: integer dot products (int8_digits.h). VPDPBUSD
// multiplies 64 unsigned bytes by 64 signed ones and adds each four products into a 32-bit lane, exactly, in one
// instruction, where the float32 kernel above spends three (widen, convert, FMA) on 16 weights; that, not memory,
// held one row of int8 weights back. The digits are the signed operand; a weight q goes in as the unsigned byte
// q + 128, and sum_k q_k X_k = sum_j 2^8j sum_k (q_k + 128) d_jk - 128 sum_k X_k.
using int8_digits::DigitRows;
using int8_digits::kDigits;

#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))

// The float32 bit patterns of the (up to) 16 bfloat16 values at p, zeros past `count`.
VNNI_TARGET inline __m512i bf16_bits(const uint16_t* p, int64_t count) {
  const __mmask16 mask = count >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << count) - 1);
  return _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16);
}

// One row of K bfloat16 values as its digits (each of the kDigits rows of `digits` `stride` apart); false where
// the row holds an infinity or a NaN (whose products only floating point gives).
VNNI_TARGET bool row_digits(const uint16_t* x, int64_t K, int8_t* digits, int64_t stride, double& unit,
                            int64_t& sum) {
  // the largest magnitude, compared as bit patterns (the same order for non-negative floats; -ffast-math may
  // assume that no value is infinite, so no float comparison would be trusted to see one)
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  __m512i top = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 16) top = _mm512_max_epi32(top, _mm512_and_si512(bf16_bits(x + k, K - k), magnitude));
  const int32_t largest = _mm512_reduce_max_epi32(top);
  if (largest >= 0x7f800000) return false;
  unit = 1.0;
  sum = 0;
  if (largest == 0) return true;  // the digits stay zero
  const int s = 22 - (std::max(largest >> 23, 1) - 126);  // every |x| < 2^(22 - s)
  const __m512 power = _mm512_set1_ps(static_cast<float>(s));
  __m512i sums[kDigits] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
  for (int64_t k = 0; k < K; k += 16) {
    // x 2^s (exact where it is not below the smallest float32), rounded to the nearest integer, ties to even
    const __m512i X = _mm512_cvtps_epi32(_mm512_scalef_ps(_mm512_castsi512_ps(bf16_bits(x + k, K - k)), power));
    const __m512i d0 = _mm512_srai_epi32(_mm512_slli_epi32(X, 24), 24);  // the low byte, signed
    const __m512i X1 = _mm512_srai_epi32(_mm512_sub_epi32(X, d0), 8);
    const __m512i d1 = _mm512_srai_epi32(_mm512_slli_epi32(X1, 24), 24);
    const __m512i d[kDigits] = {d0, d1, _mm512_srai_epi32(_mm512_sub_epi32(X1, d1), 8)};
    for (int j = 0; j < kDigits; ++j) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(digits + j * stride + k), _mm512_cvtepi32_epi8(d[j]));
      sums[j] = _mm512_add_epi32(sums[j], d[j]);
    }
  }
  for (int j = kDigits - 1; j >= 0; --j) sum = sum * 256 + _mm512_reduce_add_epi32(sums[j]);  // sum_k X_k
  unit = std::ldexp(1.0, -s);
  return true;
}

// The digits of x's rows (bfloat16 [M, K]), or none where a row holds an infinity or a NaN.
std::optional<DigitRows> digit_rows(const uint16_t* x, int64_t M, int64_t K) {
  const int64_t stride = (K + 63) / 64 * 64;
  DigitRows rows{std::vector<int8_t>(M * kDigits * stride, 0), std::vector<double>(M), std::vector<int64_t>(M),
                 stride};
  for (int64_t m = 0; m < M; ++m) {
    if (!row_digits(x + m * K, K, rows.digits.data() + m * kDigits * stride, stride, rows.units[m], rows.sums[m]))
      return std::nullopt;
  }
  return rows;
}

// R weight rows from n by M rows of x, from their digits, 64 weights of a row at a time; the last (partial) block
// by a masked load, after the loop (a masked load in the loop kept the sums in memory rather than registers).
// Past K the weights load as zero, q + 128 = 128, against digits that are zero.
template <int M, int R, typename Out>
VNNI_TARGET void stream_rows_vnni(const StreamArgs<int8_t, Out>& a, int64_t n) {
  const int64_t K = a.K, body = K - K % 64;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));  // q + 128 as an unsigned byte
  __m512i acc[R][M][kDigits];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < kDigits; ++j) acc[r][m][j] = _mm512_setzero_si512();
  for (int64_t k = 0; k < body; k += 64) {
    __m512i u[R];
    for (int r = 0; r < R; ++r) {
      if (a.prefetch != nullptr) software_prefetch::ahead(*a.prefetch, a.w + (n + r) * K + k);
      u[r] = _mm512_xor_si512(_mm512_loadu_si512(a.w + (n + r) * K + k), flip);
    }
    for (int m = 0; m < M; ++m) {
      for (int j = 0; j < kDigits; ++j) {
        const __m512i d = _mm512_loadu_si512(a.digits + (m * kDigits + j) * a.digit_stride + k);
        for (int r = 0; r < R; ++r) acc[r][m][j] = _mm512_dpbusd_epi32(acc[r][m][j], u[r], d);
      }
    }
  }
  if (body < K) {
    const __mmask64 mask = (static_cast<__mmask64>(1) << (K - body)) - 1;
    __m512i u[R];
    for (int r = 0; r < R; ++r) u[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, a.w + (n + r) * K + body), flip);
    for (int m = 0; m < M; ++m) {
      for (int j = 0; j < kDigits; ++j) {
        const __m512i d = _mm512_loadu_si512(a.digits + (m * kDigits + j) * a.digit_stride + body);
        for (int r = 0; r < R; ++r) acc[r][m][j] = _mm512_dpbusd_epi32(acc[r][m][j], u[r], d);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < M; ++m) {
      int64_t sum = 0;  // sum_j 2^8j sum_k (q_k + 128) d_jk
      for (int j = kDigits - 1; j >= 0; --j) sum = sum * 256 + _mm512_reduce_add_epi32(acc[r][m][j]);
      int8_digits::store(int8_digits::output(sum - 128 * a.sums[m], a.units[m], a.scale, a.bias, n + r),
                         a.out + m * a.N + n + r);
    }
  }
}

// The integer kernel for int8 weights: one weight row at a time from memory (its three sums are three chains of
// additions already; on the Intel Xeon of BENCHMARKS.md a 177 MB product of one row took 1.12 x the read on one
// thread this way, 1.28 x two rows at a time); from the cache, as many as keep the R * M * 3 sums in registers.
// There, the 216M model's int8 products of one row in model order took 1.35 x the read against the float32
// kernel's 1.54 x, of four rows 1.96 x against 2.19 x (scratch, both kernels in one process, seven alternating
// passes each); of more rows, see amx_linear.cpp. VPDPBUSD runs there at the rate of the float32 FMA (ten
// independent chains of 512-bit ones on one core: 3.2 - 3.4 against 3.1 - 3.2 billion a second, scratch), yet at four
// rows the integers are barely ahead, and at 64 rows on VNNI they took 1.4 x as long as the float32 kernel. For one
// row, AMX-INT8 (the same sums) read the weights from memory more slowly than this kernel (BENCHMARKS.md).
struct Avx512Vnni {
  template <int M>
  static constexpr int kWeightRows = M == 1 ? 4 : 2;
  template <int M, typename W>
  static constexpr int kMemoryRows = 1;
  template <int M, int R, typename Out>
  static void rows(const StreamArgs<int8_t, Out>& a, int64_t n) { stream_rows_vnni<M, R>(a, n); }
};

// bfloat16 weights by bfloat16 rows on CPUs with AVX512-BF16: VDPBF16PS multiplies 32 bfloat16 pairs exactly and
// adds them into 16 float32 sums, a cache line of weights in one instruction where the float32 kernel above spends
// four (widen the even and the odd elements, two FMAs), and x needs no float32 copy. On the Intel Xeon of
// BENCHMARKS.md, the 216M model's products in model order (scratch, medians of seven passes, alternating rounds in
// one process, on a day its speed varied a lot): one row 1.18 - 1.28 x the read against the float32 kernel's 1.22 -
// 1.36 x, two rows 1.28 - 1.34 x against 1.35 - 1.44 x, four 1.51 - 1.64 x against 1.68 - 1.78 x (four rounds).
// Arithmetic: each line's products added into the output's float32 sum in one order whatever R and M, so a row gets
// the same bits alone as among many; like AMX (amx_linear.cpp) and oneDNN's bfloat16 products, the instruction
// takes denormal inputs as zero and flushes denormal sums to zero.
#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma")))

// The 32 bfloat16 values at p; with Tail, those under `mask`, zeros elsewhere.
template <bool Tail>
BF16_TARGET inline __m512i bf16_line(const uint16_t* p, __mmask32 mask) {
  if constexpr (Tail) return _mm512_maskz_loadu_epi16(mask, p);
  return _mm512_loadu_si512(p);
}

// One cache line of R weight rows (from k) into the M x R sums; the last, partial line (Tail) by masked loads that
// give zeros past K.
template <int M, int R, bool Tail, typename Out>
BF16_TARGET __attribute__((always_inline)) inline void dpbf16_line(const StreamArgs<uint16_t, Out>& a, int64_t n,
                                                                   int64_t k, __m512 (&acc)[R][M]) {
  const __mmask32 mask = Tail ? static_cast<__mmask32>((1u << (a.K - k)) - 1) : static_cast<__mmask32>(~0u);
  __m512bh xs[M];
  for (int m = 0; m < M; ++m) xs[m] = (__m512bh)bf16_line<Tail>(a.x_bf16 + m * a.K + k, mask);
  for (int r = 0; r < R; ++r) {
    const __m512bh wv = (__m512bh)bf16_line<Tail>(a.w + (n + r) * a.K + k, mask);
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, xs[m]);
  }
}

template <int M, int R, typename Out>
BF16_TARGET void stream_rows_dpbf16(const StreamArgs<uint16_t, Out>& a, int64_t n) {
  constexpr int64_t kLine = 32;  // bfloat16 weights per cache line
  const int64_t K = a.K, body = K - K % kLine;
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < body; k += kLine) {
    if (a.prefetch != nullptr) {
      for (int r = 0; r < R; ++r) software_prefetch::ahead(*a.prefetch, a.w + (n + r) * K + k);
    }
    dpbf16_line<M, R, false>(a, n, k, acc);
  }
  if (body < K) dpbf16_line<M, R, true>(a, n, body, acc);
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) store(a, m, n + r, _mm512_reduce_add_ps(acc[r][m]));
}

// The VDPBF16PS kernel: from memory, one row of x by two neighbouring weight rows at a time (two chains of additions
// in one stream: one row's products took 1.04 - 1.36 x the read so, 1.08 - 1.42 x one weight row at a time, the
// former faster in all six alternating rounds of the scratch comparison above), else as the AVX-512 kernel.
struct Avx512Bf16 {
  template <int M>
  static constexpr int kWeightRows = M == 1 ? 8 : 4;
  template <int M, typename W>
  static constexpr int kMemoryRows = M == 1 ? 2 : 1;
  template <int M, int R, typename Out>
  static void rows(const StreamArgs<uint16_t, Out>& a, int64_t n) { stream_rows_dpbf16<M, R>(a, n); }
};

// Weight rows [n0, n1) by a.M <= 4 rows of x with one vector kernel. Where the weights come from memory,
// Isa::kMemoryRows neighbouring rows at a time (mostly one), so that they arrive as one sequential stream with the
// software prefetch ahead of it (rows far apart are several streams, which read slower); where they come from the
// cache, Isa::kWeightRows rows at a time; then one by one. A row's sums are the same either way. The row kernels
// carry their instruction set's target attribute (a shared template could only carry both, and then emit AVX-512
// into the AVX2 kernel), so they stay apart; this loop is common. Their shared lines (zeroing the sums, prefetching
// a line of each row) stay written out in each: as one inline helper without a target, GCC compiled the VDPBF16PS
// kernel's loops differently and the bf16 216M step at batch 1 took 17.9 - 18.2 ms against 13.6 - 14.2 ms (the
// Intel Xeon of BENCHMARKS.md, three alternating pairs of processes).
template <typename Isa, int M, typename W, typename Out>
void stream_vector_m(const StreamArgs<W, Out>& a, int64_t n0, int64_t n1) {
  constexpr int R = Isa::template kWeightRows<M>;
  int64_t n = n0;
  if (a.prefetch == nullptr) {
    for (; n + R <= n1; n += R) Isa::template rows<M, R>(a, n);
  } else {
    constexpr int kMemoryRows = Isa::template kMemoryRows<M, W>;
    for (; n + kMemoryRows <= n1; n += kMemoryRows) Isa::template rows<M, kMemoryRows>(a, n);
  }
  for (; n < n1; ++n) Isa::template rows<M, 1>(a, n);
}

template <typename Isa, typename W, typename Out>
void stream_vector(const StreamArgs<W, Out>& a, int64_t n0, int64_t n1) {
  switch (a.M) {
    case 1: return stream_vector_m<Isa, 1>(a, n0, n1);
    case 2: return stream_vector_m<Isa, 2>(a, n0, n1);
    case 3: return stream_vector_m<Isa, 3>(a, n0, n1);
    default: return stream_vector_m<Isa, 4>(a, n0, n1);
  }
}
#endif

// What the CPU runs (GCC's and Clang's __builtin_cpu_supports, which exists on x86 only), each asked once.
#ifdef HAVE_X86_KERNELS
#define CPU_SUPPORTS(feature) __builtin_cpu_supports(feature)
#else
#define CPU_SUPPORTS(feature) false
#endif

bool cpu_has_avx2_fma() {
  static const bool has = CPU_SUPPORTS("avx2") && CPU_SUPPORTS("fma");
  return has;
}

bool cpu_has_avx512() {
  static const bool has = cpu_has_avx2_fma() && CPU_SUPPORTS("avx512f");
  return has;
}

bool cpu_has_avx512_vnni() {
  static const bool has =
      cpu_has_avx512() && CPU_SUPPORTS("avx512bw") && CPU_SUPPORTS("avx512vl") && CPU_SUPPORTS("avx512vnni");
  return has;
}

bool cpu_has_avx512_bf16() {
  static const bool has = cpu_has_avx512_vnni() && CPU_SUPPORTS("avx512bf16");
  return has;
}

bool always() { return true; }

// The streaming kernels, best first (kAvx512Vnni: kAvx512 with int8 weights by bfloat16 rows in integers;
// kAvx512Bf16: kAvx512Vnni with bfloat16 weights by bfloat16 rows on VDPBF16PS).
enum class Kernel { kAvx512Bf16, kAvx512Vnni, kAvx512, kAvx2, kPortable };

// Each kernel's name (stream_linear's `kernel`), whether this CPU runs it, and what it needs (for the refusal).
struct KernelEntry {
  const char* name;
  Kernel kernel;
  bool (*runs)();
  const char* needs;
};
constexpr KernelEntry kKernels[] = {{"avx512-bf16", Kernel::kAvx512Bf16, cpu_has_avx512_bf16, "AVX512-BF16"},
                                    {"avx512-vnni", Kernel::kAvx512Vnni, cpu_has_avx512_vnni, "AVX512-VNNI"},
                                    {"avx512", Kernel::kAvx512, cpu_has_avx512, "AVX-512"},
                                    {"avx2", Kernel::kAvx2, cpu_has_avx2_fma, "AVX2 and FMA"},
                                    {"portable", Kernel::kPortable, always, ""}};

// "auto, avx512-bf16, ..., avx2 or portable": what stream_linear's `kernel` may be.
std::string kernel_names() {
  std::string names = "auto";
  for (const auto& entry : kKernels) {
    names += std::string(entry.kernel == Kernel::kPortable ? " or " : ", ") + entry.name;
  }
  return names;
}

void check_inputs(const torch::Tensor& x, const torch::Tensor& weight, const std::optional<torch::Tensor>& scale,
                  const std::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "stream_linear: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "stream_linear: x must be [M, K] and weight [N, K]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16,
              "stream_linear: x must be float32 or bfloat16");
  const auto kind = weight.scalar_type();
  TORCH_CHECK(kind == torch::kBFloat16 || kind == torch::kChar, "stream_linear: the weight must be bfloat16 or int8");
  TORCH_CHECK((kind == torch::kChar) == scale.has_value(),
              "stream_linear: int8 weights need a scale, bfloat16 ones none");
  TORCH_CHECK(!scale || scale->numel() == weight.size(0), "stream_linear: the scale must have one value per output");
  TORCH_CHECK(!bias || bias->numel() == weight.size(0), "stream_linear: the bias must have one value per output");
}

// The conversions of every product's small operands to float32 are loops (cpu_floats.h, float_rows) rather
// than ATen ops, for each of the step's 127 products. On the EPYC of the comment at the top, torch.profiler counted
// 472 conversions (aten::_to_copy) per token in the int8 216M step with ATen's, 218 with these, as many as in the
// bf16 step.

// A scale or bias as float32 values (none for none).
cpu_floats::Floats as_floats(const std::optional<torch::Tensor>& t) { return t ? floats_of(*t) : cpu_floats::Floats{}; }

// x as float32 [M, K], row-major: x's own memory where it is float32 and needs no reordering, else a copy
// (a vector, not a tensor: an allocation without a dispatched op).
struct FloatRows {
  torch::Tensor source;
  std::vector<float> copy;
  const float* data;
};

// With a `deinterleave` width B (0: none), each whole B-wide block of the reduction as its B/2 even then its B/2
// odd elements, the rest as it is (the order in which the vector kernels widen bfloat16 weights: B = 16 for AVX2,
// 32 for AVX-512).
FloatRows float_rows(const torch::Tensor& x, int64_t deinterleave) {
  FloatRows rows{contiguous(x), {}, nullptr};
  const auto& xc = rows.source;
  if (deinterleave == 0 && xc.scalar_type() == torch::kFloat32) {
    rows.data = xc.data_ptr<float>();
    return rows;
  }
  const int64_t M = xc.size(0), K = xc.size(1), B = deinterleave, body = B > 0 ? K - K % B : 0;
  rows.copy.resize(M * K);
  float* dst = rows.copy.data();
  const auto convert = [&](const auto* src) {
    for (int64_t m = 0; m < M; ++m) {
      const auto* row = src + m * K;
      float* to = dst + m * K;
      for (int64_t b = 0; b < body; b += B) {
        for (int64_t j = 0; j < B / 2; ++j) {
          to[b + j] = static_cast<float>(row[b + 2 * j]);
          to[b + B / 2 + j] = static_cast<float>(row[b + 2 * j + 1]);
        }
      }
      for (int64_t k = body; k < K; ++k) to[k] = static_cast<float>(row[k]);
    }
  };
  if (xc.scalar_type() == torch::kFloat32) {
    convert(xc.data_ptr<float>());
  } else {
    convert(xc.data_ptr<at::BFloat16>());
  }
  rows.data = dst;
  return rows;
}

// Blocks of weight rows over the threads; within a block, the rows of x four at a time, so that a block
// read from memory once serves every row from the cache. Each output element is summed the same way
// whatever M is, so one row decoded alone gets exactly the value it gets among many.
template <typename W, typename Out>
void run_stream(const StreamArgs<W, Out>& a, Kernel kernel) {
  const int64_t grain = std::max<int64_t>(1, kMinWeightsPerThread / std::max<int64_t>(a.K, 1));
  const int64_t block = std::max<int64_t>(1, kStreamBlockWeights / std::max<int64_t>(a.K, 1));
  at::parallel_for(0, a.N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t b0 = n0; b0 < n1; b0 += block) {
      const int64_t b1 = std::min(n1, b0 + block);
      for (int64_t m0 = 0; m0 < a.M; m0 += kMaxStreamRows) {
        StreamArgs<W, Out> rows = a;
        rows.x = a.x + m0 * a.K;
        rows.out = a.out + m0 * a.N;
        rows.M = std::min(kMaxStreamRows, a.M - m0);
#ifdef HAVE_X86_KERNELS
        if constexpr (std::is_same_v<W, uint16_t>) {
          if (kernel == Kernel::kAvx512Bf16) {  // stream_dispatch sends it bfloat16 rows only
            rows.x_bf16 = a.x_bf16 + m0 * a.K;
            stream_vector<Avx512Bf16>(rows, b0, b1);
            continue;
          }
        }
        if (kernel == Kernel::kAvx512Vnni || kernel == Kernel::kAvx512Bf16) {
          if constexpr (std::is_same_v<W, int8_t>) {
            rows.digits = a.digits + m0 * kDigits * a.digit_stride;
            rows.units = a.units + m0;
            rows.sums = a.sums + m0;
            stream_vector<Avx512Vnni>(rows, b0, b1);
          } else {
            stream_vector<Avx512>(rows, b0, b1);
          }
          continue;
        }
        if (kernel == Kernel::kAvx512) {
          stream_vector<Avx512>(rows, b0, b1);
          continue;
        }
        if (kernel == Kernel::kAvx2) {
          stream_vector<Avx2>(rows, b0, b1);
          continue;
        }
#endif
        stream_portable(rows, b0, b1);
      }
    }
  });
}

// The best vector kernel this CPU runs, if any.
std::optional<Kernel> vector_kernel() {
  for (const auto& entry : kKernels) {
    if (entry.kernel != Kernel::kPortable && entry.runs()) return entry.kernel;
  }
  return std::nullopt;
}

// Evict `n` bytes from p from every cache, so that the next pass over them reads them from memory (CLFLUSHOPT
// where the CPU has it: CLFLUSH is ordered, one line after the other, and took most of the calibration's time).
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("clflushopt"))) void flush_unordered(char* bytes, int64_t n) {
  for (int64_t i = 0; i < n; i += 64) _mm_clflushopt(bytes + i);
}
#endif
void flush_from_caches(void* p, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool unordered = __builtin_cpu_supports("clflushopt");
  char* bytes = static_cast<char*>(p);
  if (unordered) {
    flush_unordered(bytes, n);
  } else {
    for (int64_t i = 0; i < n; i += 64) _mm_clflush(bytes + i);
  }
  _mm_mfence();
#endif
}

// The index of the fastest of kPrefetches on this machine: one row of x by a 24 MiB bfloat16 weight (768 wide,
// the model's width) through the best vector kernel and the threads, the weight flushed from the caches before
// each pass. After one pass that is not timed (it starts the threads and warms the code: the first pass took up to
// 2.4 x the others), rounds that each time every candidate once (in an order that turns from round to round) and
// give a vote to the fastest, until one candidate holds most of kRounds votes (after all of them, a tie keeps the
// first). A vote per round, not each candidate's fastest pass: a disturbance of the machine lasting a round then
// costs one vote, where before it could decide. On the Intel Xeon of BENCHMARKS.md the passes take 1.02 - 1.31 ms
// (5 - 95 %) with "l1-2k" and 0.87 - 1.09 ms with "l2-16k" (100 scratch processes), and the calibration 34 - 44
// ms. Still, 3 of 274 processes chose "l1-2k" (2 of 54 with five rounds and no untimed pass), and in the two of
// them that then measured both on a 600 MB weight, "l2-16k" was the faster there too (25.5 - 26.4 ms against 28.4
// - 29.8): the calibration's own weight misled them. A vote only for a margin of 5 % (against disturbances that
// last the whole calibration) still chose "l1-2k" in 1 of 150, and was not kept. `set_stream_prefetch` fixes the
// choice where that matters.
int calibrate_prefetch() {
  const auto kernel = vector_kernel();
  if (!kernel) return 0;  // the portable kernel does not prefetch
  constexpr int64_t N = 16 * 1024, K = 768, kRounds = 9;
  std::vector<uint16_t> weight(N * K, 0x3f80);  // bfloat16 1.0, written so that every page is there
  std::vector<float> x(K, 1.0f), out(N);
  const std::vector<uint16_t> x_bf16(K, 0x3f80);  // the same row for the VDPBF16PS kernel
  const auto pass = [&](int c) {
    flush_from_caches(weight.data(), N * K * static_cast<int64_t>(sizeof(uint16_t)));
    StreamArgs<uint16_t, float> args{x.data(), weight.data(), nullptr, nullptr, out.data(), 1, N, K, &kPrefetches[c]};
    args.x_bf16 = x_bf16.data();
    const auto start = std::chrono::steady_clock::now();
    run_stream(args, *kernel);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  pass(0);
  std::vector<int> votes(software_prefetch::kCount, 0);
  for (int round = 0; round < kRounds; ++round) {
    std::vector<double> took(software_prefetch::kCount);
    for (int i = 0; i < software_prefetch::kCount; ++i) {
      const int c = (i + round) % software_prefetch::kCount;
      took[c] = pass(c);
    }
    if (++votes[std::min_element(took.begin(), took.end()) - took.begin()] > kRounds / 2) break;
  }
  return static_cast<int>(std::max_element(votes.begin(), votes.end()) - votes.begin());
}

// The prefetch set by `set_stream_prefetch`, or -1 for the calibrated one.
std::atomic<int> forced_prefetch{-1};

// The prefetch the vector kernels use where the weights come from memory.
const Prefetch& stream_prefetch() {
  const int forced = forced_prefetch.load();
  if (forced >= 0) return kPrefetches[forced];
  static const int calibrated = calibrate_prefetch();
  return kPrefetches[calibrated];
}

template <typename W>
void stream_dispatch(const torch::Tensor& x, const torch::Tensor& w, const float* s, const float* b,
                     torch::Tensor& out, Kernel kernel) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const W* w_ = reinterpret_cast<const W*>(w.data_ptr());
  // VDPBF16PS takes bfloat16 weights by bfloat16 rows; the rest goes as on AVX512-VNNI (float32 rows keep float32
  // arithmetic: rounding them to bfloat16 would change them)
  if (kernel == Kernel::kAvx512Bf16 && !(std::is_same_v<W, uint16_t> && x.scalar_type() == torch::kBFloat16)) {
    kernel = Kernel::kAvx512Vnni;
  }
#ifdef HAVE_X86_KERNELS
  // int8 weights by bfloat16 rows in integers; float32 rows keep float32 arithmetic (22-bit integers would round
  // them), and rows with an infinity or a NaN, or too long a reduction, go to the float32 kernel
  std::optional<DigitRows> digits;
  if constexpr (std::is_same_v<W, int8_t>) {
    if (kernel == Kernel::kAvx512Vnni) {
      const auto xc = contiguous(x);
      if (xc.scalar_type() == torch::kBFloat16 && K <= int8_digits::kMaxReduction) {
        digits = digit_rows(reinterpret_cast<const uint16_t*>(xc.data_ptr()), M, K);
      }
      if (!digits) kernel = Kernel::kAvx512;
    }
    if (digits && M > kMaxStreamRows && int8_digits::amx_usable()) {  // many rows: the same sums on AMX-INT8
      int8_digits::amx_product(*digits, M, w_, N, K, s, b, out.data_ptr<at::BFloat16>());
      return;
    }
  }
#endif
  // the width of the vector kernels' bfloat16 blocks (widen16, line_vector); int8 and the portable kernel: none
  const int64_t block = !std::is_same_v<W, uint16_t>                                 ? 0
                        : kernel == Kernel::kAvx2                                    ? 16
                        : kernel == Kernel::kAvx512 || kernel == Kernel::kAvx512Vnni ? 32
                                                                                    : 0;
  const bool own_rows = kernel == Kernel::kAvx512Bf16 || (kernel == Kernel::kAvx512Vnni && std::is_same_v<W, int8_t>);
  const auto xf = own_rows ? FloatRows{} : float_rows(x, block);
  const auto x_rows = kernel == Kernel::kAvx512Bf16 ? contiguous(x) : torch::Tensor();  // VDPBF16PS's rows
  // one group of rows: one pass over the weights, from memory
  const Prefetch* prefetch = M <= kMaxStreamRows && kernel != Kernel::kPortable ? &stream_prefetch() : nullptr;
  const auto run = [&](auto args) {
#ifdef HAVE_X86_KERNELS
    if (digits) {
      args.digits = digits->digits.data();
      args.units = digits->units.data();
      args.sums = digits->sums.data();
      args.digit_stride = digits->stride;
    }
#endif
    if (kernel == Kernel::kAvx512Bf16) args.x_bf16 = reinterpret_cast<const uint16_t*>(x_rows.data_ptr());
    run_stream(args, kernel);
  };
  if (out.scalar_type() == torch::kFloat32) {
    run(StreamArgs<W, float>{xf.data, w_, s, b, out.data_ptr<float>(), M, N, K, prefetch});
  } else {
    run(StreamArgs<W, at::BFloat16>{xf.data, w_, s, b, out.data_ptr<at::BFloat16>(), M, N, K, prefetch});
  }
}

}  // namespace

// The product kernels this CPU can run, best first: "avx512-bf16" (and AVX512-BF16: "avx512-vnni" with bfloat16
// weights by bfloat16 rows on VDPBF16PS), "avx512-vnni" (AVX-512F, BW, VL and VNNI: "avx512" with int8 weights by
// bfloat16 rows in integers), "avx512" (AVX-512F), "avx2" (AVX2 and FMA), "portable".
std::vector<std::string> linear_kernels_cpu() {
  std::vector<std::string> kernels;
  for (const auto& entry : kKernels) {
    if (entry.runs()) kernels.emplace_back(entry.name);
  }
  return kernels;
}

// The prefetch of the vector kernels where the weights come from memory, by name ("l1-2k": 2 KiB ahead into the
// L1 cache, "l2-16k": 16 KiB ahead into the L2), as measured on this machine at the first call (or as set);
// "none" where the CPU has no vector kernel.
std::string stream_prefetch_cpu() {
  if (!vector_kernel()) return "none";
  return stream_prefetch().name;
}

// Use the prefetch `name` (one of stream_prefetch_cpu's) from now on, or the measured one again ("auto"). A
// prefetch changes no value, only the speed: for tests and benchmarks.
void set_stream_prefetch_cpu(const std::string& name) {
  if (name == "auto") {
    forced_prefetch.store(-1);
    return;
  }
  const int c = software_prefetch::find(name);
  TORCH_CHECK(c >= 0, "set_stream_prefetch: unknown prefetch '", name, "' (", software_prefetch::names("auto"), ")");
  forced_prefetch.store(c);
}

// x: [M, K] float32 or bfloat16; weight: [N, K] bfloat16, or int8 with scale [N]; bias: [N].
// Returns [M, N] in x's dtype. `kernel`: "auto" (the best this CPU runs) or one of linear_kernels_cpu's.
torch::Tensor stream_linear_cpu(torch::Tensor x, torch::Tensor weight, std::optional<torch::Tensor> scale,
                                std::optional<torch::Tensor> bias, const std::string& kernel) {
  check_inputs(x, weight, scale, bias);
  std::optional<Kernel> chosen;
  for (const auto& entry : kKernels) {
    if (kernel != entry.name) continue;
    TORCH_CHECK(entry.runs(), "stream_linear: this CPU has no ", entry.needs);
    chosen = entry.kernel;
  }
  // (the message is built only when the check fails: once per product would be a hot path)
  TORCH_CHECK(kernel == "auto" || chosen, "stream_linear: unknown kernel '", kernel, "' (", kernel_names(), ")");
  if (!chosen) chosen = vector_kernel().value_or(Kernel::kPortable);
  const auto w = contiguous(weight);
  const auto sf = as_floats(scale), bf = as_floats(bias);
  auto out = torch::empty({x.size(0), w.size(0)}, x.options());
  const float* s = scale ? sf.data() : nullptr;
  const float* b = bias ? bf.data() : nullptr;
  if (w.scalar_type() == torch::kChar) {
    stream_dispatch<int8_t>(x, w, s, b, out, *chosen);
  } else {
    stream_dispatch<uint16_t>(x, w, s, b, out, *chosen);
  }
  return out;
}
