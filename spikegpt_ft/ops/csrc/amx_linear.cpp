// Linear products of many rows on Intel AMX: y = x W^T (+ bias), bfloat16 weights, inputs and outputs; and int8
// weights by bfloat16 rows in integers (AMX-INT8, at the end of this file).
//
// Why hand-written: at 64 rows (batch decoding, bfloat16 evaluation on the CPU) the product is fed by reading
// the weights, and PyTorch's bfloat16 F.linear on the CPU, which runs oneDNN's AMX kernels on the weight as it
// is stored, takes 1.1 - 1.35 x the time of this kernel on a weight laid out for the tiles beforehand
// (`bench recurrent`'s products alone at 64 rows, five sets of runs; BENCHMARKS.md gives one). PyTorch's way
// to keep such a layout (torch.ops.mkldnn._reorder_linear_weight) is an undocumented internal op, so the
// layout and the product are written here against the instruction set (Intel's AMX intrinsics).
//
// The weight is laid out once (`amx_pack_weight`): output channels in pairs of 16 (two B tiles), and for each
// pair the 32-wide blocks of the reduction one after the other, each 16 x 16 x 2 as TDPBF16PS reads B (pairs
// of neighbouring k side by side), zero-padded to whole tiles. x is read as A tiles (16 rows x 32 k): from x
// itself where its rows fill whole tiles (16 rows, K apart), else from a zero-padded copy laid out per call. The
// tiles: 4 accumulators (2 x 2 blocks of 16 x 16), 2 A, 2 B; for every pair of output tiles the rows run 32 at a
// time over the whole reduction, so each weight tile is read from memory once and, for more than 32 rows, again
// from the cache.
//
// Arithmetic: TDPBF16PS multiplies bfloat16 pairs exactly and accumulates in float32 (denormal inputs and
// results as zero); the bias (float32 of its stored value) is added, and the sum rounded once to bfloat16,
// to nearest even. That is what PyTorch's bfloat16 product computes, up to the order of the float32 additions.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include "int8_digits.h"

#if defined(__x86_64__) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define HAVE_AMX_KERNEL 1
#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))
#define AMX_INT8_TARGET __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl")))
#endif

namespace {

// Output channels per weight tile, reduction elements per tile, bfloat16 elements per tile.
constexpr int64_t kTileN = 16, kTileK = 32, kTileElems = 512;
// Output channels of one pair of weight tiles, and its bfloat16 elements per 32-wide block of the reduction.
constexpr int64_t kPairN = 2 * kTileN, kPairBlockElems = 2 * kTileElems;
// Weights per thread below which a second thread costs more than it saves.
constexpr int64_t kMinWeightsPerThread = 1 << 16;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

#ifdef HAVE_AMX_KERNEL
// Linux asks a process to request the AMX tile state before it uses it (arch_prctl, kernel 5.16 and later).
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

bool cpu_has_amx_int8() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return (d >> 25 & 1) && (d >> 24 & 1);  // AMX-INT8, AMX-TILE
}

// Whether Linux granted this process the tile state (asked once).
bool tiles_granted() {
  static const bool granted = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return granted;
}

bool cpu_has_amx_bf16() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool avx512 = (b >> 16 & 1) && (b >> 30 & 1) && (b >> 31 & 1);  // F, BW, VL
  const bool amx = (d >> 22 & 1) && (d >> 24 & 1);                     // AMX-BF16, AMX-TILE
  if (!avx512 || !amx || !__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  return a >> 5 & 1;  // AVX512-BF16, for rounding the results
}

// The tile configuration of palette 1 (Intel SDM, LDTILECFG): every tile 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// This thread's eight tiles, each 16 rows of 64 bytes (both products use all of them so).
__attribute__((target("amx-tile"))) void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
}

// Where the A tiles are: tile (block kb, m tile t) at x + kb * block + t * tile, its rows `stride` bytes apart.
struct ATiles {
  const uint16_t* x;
  int64_t block, tile, stride;
};

// Rows [32 mp, 32 mp + 32) (one tile of them if `two_m` is false; a_tiles from their first tile) by one pair of
// weight tiles over the whole reduction; the four 16 x 16 float32 results in c, tile (m, n) at (2 m + n) * 256.
template <bool two_m>
AMX_TARGET void pair_pass(const ATiles& a_tiles, const uint16_t* w, int64_t blocks, float* c) {
  _tile_zero(0);
  _tile_zero(1);
  if (two_m) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t kb = 0; kb < blocks; ++kb) {
    const uint16_t* a = a_tiles.x + kb * a_tiles.block;
    const uint16_t* b = w + kb * kPairBlockElems;
    _tile_loadd(4, a, a_tiles.stride);
    _tile_loadd(6, b, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, b + kTileElems, 64);
    _tile_dpbf16ps(1, 4, 7);
    if (two_m) {
      _tile_loadd(5, a + a_tiles.tile, a_tiles.stride);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, 64);
  _tile_stored(1, c + 256, 64);
  if (two_m) {
    _tile_stored(2, c + 512, 64);
    _tile_stored(3, c + 768, 64);
  }
}

struct Product {
  ATiles a;           // x's tiles
  const uint16_t* w;  // the packed weight
  const float* bias;  // float32 [N] or null
  uint16_t* out;      // bfloat16 [M, N]
  int64_t M, N, blocks, m_tiles;
};

// Pairs [p0, p1) of weight tiles, on this thread's tiles.
AMX_TARGET void run_pairs(const Product& q, int64_t p0, int64_t p1) {
  configure_tiles();
  alignas(64) float c[4 * 256];
  for (int64_t p = p0; p < p1; ++p) {
    const uint16_t* w = q.w + p * q.blocks * kPairBlockElems;
    for (int64_t mp = 0; 2 * mp < q.m_tiles; ++mp) {
      ATiles a = q.a;
      a.x += 2 * mp * a.tile;
      if (2 * mp + 1 < q.m_tiles) {
        pair_pass<true>(a, w, q.blocks, c);
      } else {
        pair_pass<false>(a, w, q.blocks, c);
      }
      for (int nt = 0; nt < 2; ++nt) {
        const int64_t n0 = p * kPairN + nt * kTileN;
        if (n0 >= q.N) break;
        const int64_t cols = std::min(kTileN, q.N - n0);
        const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
        const __m512 bias = q.bias ? _mm512_maskz_loadu_ps(mask, q.bias + n0) : _mm512_setzero_ps();
        for (int64_t m = 32 * mp; m < std::min(q.M, 32 * mp + 32); ++m) {
          const int64_t tile = 2 * ((m / 16) % 2) + nt;
          const __m512 sum = _mm512_add_ps(_mm512_load_ps(c + tile * 256 + (m % 16) * 16), bias);
          _mm256_mask_storeu_epi16(q.out + m * q.N + n0, mask, (__m256i)_mm512_cvtneps_pbh(sum));
        }
      }
    }
  }
  _tile_release();
}
#endif

}  // namespace

// Whether this process can run the AMX product: built with it, the CPU has AMX-BF16 (and AVX512-BF16), and
// Linux granted the tile state.
bool amx_usable_cpu() {
#ifdef HAVE_AMX_KERNEL
  static const bool usable = cpu_has_amx_bf16() && tiles_granted();
  return usable;
#else
  return false;
#endif
}

// weight: [N, K] bfloat16 -> the layout amx_linear reads, [ceil(N/32), ceil(K/32), 2, 16, 16, 2], zero-padded.
torch::Tensor amx_pack_weight_cpu(torch::Tensor weight) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 && weight.scalar_type() == torch::kBFloat16,
              "amx_pack_weight: the weight must be a 2-D bfloat16 CPU tensor");
  const int64_t N = weight.size(0), K = weight.size(1), pairs = ceil_div(N, kPairN), blocks = ceil_div(K, kTileK);
  auto padded = torch::zeros({pairs * kPairN, blocks * kTileK}, weight.options());
  padded.narrow(0, 0, N).narrow(1, 0, K).copy_(weight);
  // [pair, tile, n, block, k pair, 2] -> [pair, block, tile, k pair, n, 2]
  return padded.view({pairs, 2, kTileN, blocks, kTileK / 2, 2}).permute({0, 3, 1, 4, 2, 5}).contiguous();
}

// x: [M, K] bfloat16; packed: amx_pack_weight of a [N, K] weight; bias: [N] or None. Returns [M, N] bfloat16.
torch::Tensor amx_linear_cpu(torch::Tensor x, torch::Tensor packed, int64_t N, std::optional<torch::Tensor> bias) {
  TORCH_CHECK(amx_usable_cpu(), "amx_linear: this CPU or build cannot run AMX products (see amx_usable)");
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == torch::kBFloat16,
              "amx_linear: x must be a [M, K] bfloat16 CPU tensor");
  const int64_t M = x.size(0), K = x.size(1), blocks = ceil_div(K, kTileK);
  TORCH_CHECK(packed.dim() == 6 && packed.scalar_type() == torch::kBFloat16 && packed.is_contiguous() &&
                  packed.size(0) == ceil_div(N, kPairN) && packed.size(1) == blocks && packed.size(2) == 2 &&
                  packed.size(3) == kTileK / 2 && packed.size(4) == kTileN && packed.size(5) == 2,
              "amx_linear: packed is not amx_pack_weight of a [", N, ", ", K, "] weight");
  TORCH_CHECK(!bias || bias->numel() == N, "amx_linear: the bias must have one value per output");
  auto out = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
#ifdef HAVE_AMX_KERNEL
  const int64_t m_tiles = ceil_div(M, kTileN);
  const auto xc = x.contiguous();
  const auto* src = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  // Where x's rows fill whole tiles (M a multiple of 16, K of 32), the A tiles are read from x itself: tile (kb, t)
  // is its rows 16 t .. 16 t + 15 from column 32 kb; the tiles hold the same values as through the copy below, which
  // moved 18 MB per step at 64 rows of the 216M model on the calling thread alone while the others waited (the bf16
  // step on the Intel Xeon of BENCHMARKS.md: 35.7 - 39.2 ms in place against 41.6 - 42.9 ms, alternating runs).
  ATiles a{src, kTileK, kTileN * K, K * static_cast<int64_t>(sizeof(uint16_t))};
  torch::Tensor tiles;
  if (M % kTileN != 0 || K % kTileK != 0) {
    // A tiles [block][m tile][16 rows][32], zero-padded: rows copied 32 elements (a cache line) at a time. The
    // whole blocks are copied with a size the compiler knows, so that each copy is one vector move rather than a
    // call (as a call per block, they took 6.4 % of a 64-row step's samples on its two threads in perf).
    tiles = torch::zeros({blocks, m_tiles, kTileN, kTileK}, x.options());
    auto* dst = reinterpret_cast<uint16_t*>(tiles.data_ptr());
    const int64_t whole = K / kTileK, block_stride = m_tiles * kTileElems;
    for (int64_t m = 0; m < M; ++m) {
      const uint16_t* row = src + m * K;
      uint16_t* tile_row = dst + (m / kTileN) * kTileElems + (m % kTileN) * kTileK;
      for (int64_t kb = 0; kb < whole; ++kb) {
        std::memcpy(tile_row + kb * block_stride, row + kb * kTileK, kTileK * sizeof(uint16_t));
      }
      if (whole < blocks) {
        std::memcpy(tile_row + whole * block_stride, row + whole * kTileK, (K - whole * kTileK) * sizeof(uint16_t));
      }
    }
    a = ATiles{dst, block_stride, kTileElems, kTileK * static_cast<int64_t>(sizeof(uint16_t))};
  }
  const auto bias_f = bias ? std::optional<torch::Tensor>(bias->to(torch::kFloat32).contiguous()) : std::nullopt;
  const Product q{a, reinterpret_cast<const uint16_t*>(packed.data_ptr()),
                  bias_f ? bias_f->data_ptr<float>() : nullptr, reinterpret_cast<uint16_t*>(out.data_ptr()),
                  M, N, blocks, m_tiles};
  const int64_t grain = std::max<int64_t>(1, kMinWeightsPerThread / (kPairN * blocks * kTileK));
  at::parallel_for(0, packed.size(0), grain, [&](int64_t p0, int64_t p1) { run_pairs(q, p0, p1); });
#endif
  return out;
}

// int8 weights by x's digit rows on AMX-INT8 (int8_digits.h). TDPBSSD multiplies signed bytes by signed bytes, 16 x
// 16 x 64 at a time, into exact 32-bit sums. The weight's own rows are the A tiles (16 output channels by 64 bytes of
// the reduction, read where they are stored, K apart; through a zero-padded copy at the edges), and x's digit rows
// (kDigits per row of x) the B tiles, laid out once per call as TDPBSSD reads B: for each 64-wide block of the
// reduction and 16 digit rows, 16 rows of 4 neighbouring k side by side. The tiles as in the bfloat16 product: for
// every 32 output channels, the digit rows 32 at a time over the whole reduction (the weight rows read from memory
// once, then from the cache); their sums in a buffer, then each output from its row's kDigits sums. Many rows go
// in panels whose B tiles stay in the L2 cache (kPanelBytes), the weights read once per panel. On the Intel Xeon of
// BENCHMARKS.md the 216M model's int8 products of 64 rows in model order took 54.6 ms against the float32
// streaming kernel's 139.1 ms, of five rows 12.4 ms against 26.1 ms (scratch, one process, seven alternating
// passes); 8192 rows by a 768 x 768 weight 18.4 ms, against 25.9 ms with the outputs combined one at a time and
// 49.2 ms without panels as well, the float32 kernel's 57.2 ms and oneDNN's bfloat16 product's 4.2 ms (the fastest
// of three calls each); 64 rows by 3072 x 768 0.32 ms, against 0.54 ms one at a time.
namespace int8_digits {
namespace {

constexpr int64_t kBlockBytes = 64;   // bytes of the reduction per tile
constexpr int64_t kTileBytes = 1024;  // 16 rows of 64 bytes

// Rows of x whose B tiles fill at most this many bytes go through the weights together: the B tiles of every pair
// of output channels then come from the L2 cache (2 MiB per core on the Xeon of BENCHMARKS.md).
constexpr int64_t kPanelBytes = 1 << 20;
// B-tile bytes per thread below which laying them out on a second thread costs more than it saves.
constexpr int64_t kMinLayoutBytesPerThread = 1 << 16;

// M rows of x (their digits laid out as B tiles) by the weight, into out[M, N].
struct DigitProduct {
  const int8_t* w;
  const int8_t* b;  // the B tiles: [block][column tile][16][64]
  const double* units;
  const float* scale;
  const float* bias;
  c10::BFloat16* out;
  int64_t M, N, K, blocks, columns;  // columns: digit rows, padded to 32
};

#ifdef HAVE_AMX_KERNEL
// The outputs of `count` (up to 16) channels from n for every row, from the buffer of their sums (channel i's at
// row i): each row's kDigits sums gathered for the 16 channels at once, then `output` and `to_bfloat16` in vectors
// (sums, units, scales and biases widened to double exactly; the same operations, so the same bits).
AMX_INT8_TARGET void combine16(const DigitProduct& q, const int32_t* sums, int64_t n, int64_t count) {
  const __mmask16 valid = count >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << count) - 1);
  const __m512i at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                        _mm512_set1_epi32(static_cast<int>(q.columns)));
  __m512d scale[2], bias[2];
  for (int h = 0; h < 2; ++h) {
    const __mmask8 half = static_cast<__mmask8>(valid >> (8 * h));
    scale[h] = q.scale ? _mm512_cvtps_pd(_mm256_maskz_loadu_ps(half, q.scale + n + 8 * h)) : _mm512_setzero_pd();
    bias[h] = q.bias ? _mm512_cvtps_pd(_mm256_maskz_loadu_ps(half, q.bias + n + 8 * h)) : _mm512_setzero_pd();
  }
  for (int64_t m = 0; m < q.M; ++m) {
    __m512i digit[kDigits];
    for (int j = 0; j < kDigits; ++j) {
      digit[j] = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, at, sums + m * kDigits + j, 4);
    }
    const __m512d unit = _mm512_set1_pd(q.units[m]);
    __m256i halves[2];
    for (int h = 0; h < 2; ++h) {
      __m512d d[kDigits];
      for (int j = 0; j < kDigits; ++j) {
        d[j] = _mm512_cvtepi32_pd(h == 0 ? _mm512_castsi512_si256(digit[j]) : _mm512_extracti64x4_epi64(digit[j], 1));
      }
      // sum_j 2^8j d_j: integers below 2^53, exact in any order
      const __m512d low = _mm512_fmadd_pd(d[1], _mm512_set1_pd(256.0), d[0]);
      const __m512d sum = _mm512_fmadd_pd(d[2], _mm512_set1_pd(65536.0), low);
      __m512d value = _mm512_mul_pd(sum, unit);
      if (q.scale != nullptr && q.bias != nullptr) {
        value = _mm512_fmadd_pd(value, scale[h], bias[h]);
      } else if (q.scale != nullptr) {
        value = _mm512_mul_pd(value, scale[h]);
      } else if (q.bias != nullptr) {
        value = _mm512_add_pd(value, bias[h]);
      }
      halves[h] = _mm256_castps_si256(_mm512_cvtpd_ps(value));
    }
    const __m512i bits = _mm512_inserti64x4(_mm512_castsi256_si512(halves[0]), halves[1], 1);
    const __m512i bias16 = _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                            _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    const __m512i rounded = _mm512_mask_mov_epi32(_mm512_srli_epi32(_mm512_add_epi32(bits, bias16), 16), nan,
                                                  _mm512_set1_epi32(0x7fc0));
    _mm256_mask_storeu_epi16(q.out + m * q.N + n, valid, _mm512_cvtepi32_epi16(rounded));
  }
}

// Pairs [p0, p1) of 16 output channels, on this thread's tiles.
AMX_INT8_TARGET void digit_pairs(const DigitProduct& q, int64_t p0, int64_t p1) {
  configure_tiles();
  std::vector<int32_t> sums(kPairN * q.columns);
  alignas(64) int8_t edge[2][kTileBytes];
  const int64_t column_tiles = q.columns / kTileN;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * kPairN;
    for (int64_t cp = 0; cp < q.columns / kPairN; ++cp) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t kb = 0; kb < q.blocks; ++kb) {
        const int8_t* a[2];
        int64_t stride[2];
        for (int t = 0; t < 2; ++t) {
          const int64_t n = n0 + t * kTileN, k = kb * kBlockBytes;
          if (n + kTileN <= q.N && k + kBlockBytes <= q.K) {
            a[t] = q.w + n * q.K + k;
            stride[t] = q.K;
            continue;
          }
          std::memset(edge[t], 0, kTileBytes);
          for (int64_t i = 0; i < kTileN && n + i < q.N; ++i) {  // k < K: the digits' blocks end with K's last
            std::memcpy(edge[t] + i * kBlockBytes, q.w + (n + i) * q.K + k, std::min(kBlockBytes, q.K - k));
          }
          a[t] = edge[t];
          stride[t] = kBlockBytes;
        }
        const int8_t* b = q.b + (kb * column_tiles + 2 * cp) * kTileBytes;
        _tile_loadd(4, a[0], stride[0]);
        _tile_loadd(6, b, 64);
        _tile_dpbssd(0, 4, 6);
        _tile_loadd(7, b + kTileBytes, 64);
        _tile_dpbssd(1, 4, 7);
        _tile_loadd(5, a[1], stride[1]);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
      }
      int32_t* c = sums.data() + 2 * cp * kTileN;
      const int64_t row_bytes = q.columns * static_cast<int64_t>(sizeof(int32_t));
      _tile_stored(0, c, row_bytes);
      _tile_stored(1, c + kTileN, row_bytes);
      _tile_stored(2, c + kTileN * q.columns, row_bytes);
      _tile_stored(3, c + kTileN * q.columns + kTileN, row_bytes);
    }
    for (int64_t t = 0; t < 2 && n0 + t * kTileN < q.N; ++t) {
      combine16(q, sums.data() + t * kTileN * q.columns, n0 + t * kTileN, q.N - n0 - t * kTileN);
    }
  }
  _tile_release();
}
#endif

}  // namespace

bool amx_usable() {
#ifdef HAVE_AMX_KERNEL
  static const bool usable = cpu_has_amx_int8() && tiles_granted();
  return usable;
#else
  return false;
#endif
}

void amx_product(const DigitRows& x, int64_t M, const int8_t* w, int64_t N, int64_t K, const float* scale,
                 const float* bias, c10::BFloat16* out) {
  TORCH_CHECK(amx_usable(), "amx_product: this CPU or build cannot run AMX-INT8 products");
#ifdef HAVE_AMX_KERNEL
  const int64_t blocks = x.stride / kBlockBytes;
  const int64_t panel_rows = std::max<int64_t>(kPairN, kPanelBytes / (kDigits * x.stride) / kPairN * kPairN);
  const int64_t grain = std::max<int64_t>(1, kMinWeightsPerThread / (kPairN * std::max<int64_t>(K, 1)));
  for (int64_t m0 = 0; m0 < M; m0 += panel_rows) {
    const int64_t rows = std::min(panel_rows, M - m0), digit_rows = rows * kDigits;
    const int64_t columns = ceil_div(digit_rows, kPairN) * kPairN, column_tiles = columns / kTileN;
    // B tiles: digit row r's bytes k .. k + 3 of block kb at row (k % 64) / 4, bytes 4 (r % 16) of tile (kb, r / 16);
    // zero-padded. Laid out block by block over the threads (a block's tiles share no cache line with another's): on
    // the calling thread alone, while the others waited, the int8 216M step at 64 rows took 47.3 - 50.2 ms on the
    // Intel Xeon of BENCHMARKS.md, 44.8 - 47.4 ms so (five alternating pairs of processes).
    std::unique_ptr<int8_t[]> b(new int8_t[blocks * column_tiles * kTileBytes]);
    const int64_t layout_grain = std::max<int64_t>(1, kMinLayoutBytesPerThread / (column_tiles * kTileBytes));
    at::parallel_for(0, blocks, layout_grain, [&](int64_t kb0, int64_t kb1) {
      for (int64_t kb = kb0; kb < kb1; ++kb) {
        int8_t* block_tiles = b.get() + kb * column_tiles * kTileBytes;
        std::memset(block_tiles, 0, column_tiles * kTileBytes);
        for (int64_t r = 0; r < digit_rows; ++r) {
          const int8_t* digits = x.digits.data() + (m0 * kDigits + r) * x.stride + kb * kBlockBytes;
          int8_t* tile = block_tiles + (r / kTileN) * kTileBytes + (r % kTileN) * 4;
          for (int64_t g = 0; g < kBlockBytes / 4; ++g) std::memcpy(tile + g * 64, digits + 4 * g, 4);
        }
      }
    });
    const DigitProduct q{w, b.get(), x.units.data() + m0, scale, bias, out + m0 * N, rows, N, K, blocks, columns};
    at::parallel_for(0, ceil_div(N, kPairN), grain, [&](int64_t p0, int64_t p1) { digit_pairs(q, p0, p1); });
  }
#endif
}

}  // namespace int8_digits
