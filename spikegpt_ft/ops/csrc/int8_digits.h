// int8 weights by bfloat16 rows in integers, for the CPUs that multiply bytes by bytes: AVX512-VNNI (the
// streaming kernel's "avx512-vnni", linear_cpu.cpp) and AMX-INT8 (many rows, amx_linear.cpp).
//
// Those instructions multiply signed or unsigned bytes into 32-bit sums, exactly. So x goes in as integers: each
// row scaled by a power of two, 2^s, so that its largest element stays below 2^22 in magnitude, rounded to
// integers X (exact for every bfloat16 element within a factor 2^14 of the row's largest), and X written as three
// signed base-256 digits, X = d0 + 2^8 d1 + 2^16 d2 with d in [-128, 127]. Then, for an output with int8 weights
// q, sum_k q_k X_k = sum_j 2^8j sum_k q_k d_jk: three integer sums, exact in 32 bits for reductions up to
// kMaxReduction long, and the output is 2^-s times that (exact), times the scale, plus the bias, in double,
// rounded once to float32. The sums are exact, so neither their order nor the instructions change a bit: a row
// gets the same value alone (VNNI) as among many (AMX), and one rounding of the exact product where the
// bfloat16 elements lie within 2^14 of their row's largest.
#pragma once

#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace int8_digits {

constexpr int kDigits = 3;
// The longest reduction whose digit sums fit 32 bits: 255 * 128 * K < 2^31 (the VNNI kernel's unsigned bytes, q +
// 128, are the larger).
constexpr int64_t kMaxReduction = 65536;

// x's rows as digits: row m's digit j at digits[(m * kDigits + j) * stride + k] (stride: K rounded up to 64,
// zeros beyond K), and per row the unit 2^-s and sum_k X_k.
struct DigitRows {
  std::vector<int8_t> digits;
  std::vector<double> units;
  std::vector<int64_t> sums;
  int64_t stride;
};

// The output of an exact sum_k q_k X_k (`sum`) of a row with unit `unit`, for output n: the same arithmetic in
// every kernel (std::fma: one rounding whether or not the compiler would have fused the two).
inline float output(int64_t sum, double unit, const float* scale, const float* bias, int64_t n) {
  const double product = static_cast<double>(sum) * unit;  // exact: a power of two
  if (scale == nullptr) return static_cast<float>(bias == nullptr ? product : product + bias[n]);
  return static_cast<float>(bias == nullptr ? product * scale[n] : std::fma(product, scale[n], bias[n]));
}

// float32 to bfloat16 as c10::BFloat16 rounds (to nearest even, a NaN to 0x7fc0), the NaN told by its bits (under
// -ffast-math a float test may not see one), so that every kernel, scalar or vector, rounds alike.
inline c10::BFloat16 to_bfloat16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const uint16_t rounded = (bits & 0x7fffffffu) > 0x7f800000u
                               ? static_cast<uint16_t>(0x7fc0)
                               : static_cast<uint16_t>((bits + 0x7fffu + (bits >> 16 & 1u)) >> 16);
  return c10::BFloat16(rounded, c10::BFloat16::from_bits());
}
inline void store(float value, float* to) { *to = value; }
inline void store(float value, c10::BFloat16* to) { *to = to_bfloat16(value); }

// Whether this process can run the AMX-INT8 product (amx_linear.cpp): the CPU has AMX-INT8, Linux granted the
// tile state, and the build has the kernel.
bool amx_usable();

// out [M, N] = x W^T (+ bias) for x's digit rows and int8 weights w [N, K] with their scale (or null) on AMX-INT8
// (amx_linear.cpp; only where amx_usable()), rounded to bfloat16 (the dtype of the rows the digits came from).
void amx_product(const DigitRows& x, int64_t M, const int8_t* w, int64_t N, int64_t K, const float* scale,
                 const float* bias, c10::BFloat16* out);

}  // namespace int8_digits
