// One recurrent step (one token per sequence) through a stack of SpikeGPT blocks, in one call.
//
// Why hand-written: at batch 1 a step is a few hundred tiny operations, and from Python each costs a few
// microseconds of interpreter and module dispatch, more than the arithmetic of a narrow model and a large
// part of a wide one's step (BENCHMARKS.md). Here the same operations run from C++, in the same dtypes and
// order as the modules of spikegpt_ft/model/spikegpt.py: the same kernels (WKV, LIF, streaming product),
// ATen's LayerNorm, mix, exp and sigmoid, and loops of their own for the steps whose rounding is fixed
// (conversions, sums and products of two values; see below), so the results are bitwise those of the module
// path (tests/test_decode_step.py checks it). A linear layer may carry a LoRA or SpikeLoRA adapter (its gate a
// temporal or a pointwise LIF), computed as spikegpt_ft/adapters/layer.py does. The Python side
// (spikegpt_ft/ops/decode.py) decides when this path applies and lays out the tensors; the layout of one
// block is `Slot` below.
#include <torch/extension.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_clones.h"
#include "cpu_floats.h"

// The loops below must round as the ATen ops they stand for: no FMA contraction or other fast-math rewriting
// (the extension is built with -ffast-math; see lif_cpu.cpp). no-trapping-math changes no value (nothing reads the
// floating-point exception flags) and lets GCC vectorise the loops' selects (max(0, k), NaN in the rounding).
#pragma GCC optimize("no-fast-math", "fp-contract=off", "no-trapping-math")

void wkv_step_cpu(const float* w, const float* u, const float* k, const float* v, const float* r,
                  const float* state_in, float* state_out, float* out, int64_t B, int64_t C);
void lif_step_cpu(const float* x, const float* v0, float* spikes, float* v_last, int64_t n, double tau,
                  double v_threshold, double v_reset);
torch::Tensor stream_linear_cpu(torch::Tensor x, torch::Tensor weight, std::optional<torch::Tensor> scale,
                                std::optional<torch::Tensor> bias, const std::string& kernel);
torch::Tensor amx_linear_cpu(torch::Tensor x, torch::Tensor packed, int64_t N, std::optional<torch::Tensor> bias);

namespace {

// The tensors of one block, in this order (None where a block has no such tensor: ln0 after block 0, the
// scales of bfloat16 or float32 weights, the AMX layout of weights multiplied otherwise, the LoRA matrices of a
// layer without adapter).
enum Slot : int64_t {
  kLn0Weight, kLn0Bias, kLn1Weight, kLn1Bias, kLn2Weight, kLn2Bias,
  kAttMixK, kAttMixV, kAttMixR, kTimeDecay, kTimeFirst, kFfnMixK, kFfnMixR,
  kProductSlots  // then, per product: weight, scale, packed weight, lora_A, lora_B
};  // clang-format off
// The products of one block: att.key, att.value, att.receptance, att.output, ffn.key, ffn.receptance, ffn.value.
enum Product : int64_t { kAttKey, kAttValue, kAttReceptance, kAttOutput, kFfnKey, kFfnReceptance, kFfnValue, kProducts };
constexpr int64_t kTensorsPerProduct = 5;
// How a product is multiplied: ATen's product, the streaming kernel, the AMX kernel on the packed weight.
enum Kernel : int64_t { kAten, kStream, kAmx };
constexpr int64_t kSlots = kProductSlots + kProducts * kTensorsPerProduct;
// Per product: scaling, then the gate's tau, v_threshold, v_reset.
constexpr int64_t kProductScalars = 4;
// A product's adapter gate.
enum Gate : int64_t { kNoGate, kTemporal, kPointwise };
// The neurons of one block: the gate of each product (carried by a temporal one), then lif1 and lif2.
constexpr int64_t kNeurons = kProducts + 2;
// The LIF settings of one block: tau, v_threshold, v_reset of lif1, then of lif2.
constexpr int64_t kLifSettings = 6;

using Tensors = std::vector<std::optional<torch::Tensor>>;
using cpu_floats::contiguous;
using cpu_floats::Floats;
using cpu_floats::floats_of;

// The elementwise steps between the products are written as loops over raw arrays, not ATen ops: at batch 1
// each ATen op costs microseconds of dispatch and allocation, several times the arithmetic of a 768-wide row,
// and a step has hundreds (BENCHMARKS.md, "step overhead"). Only steps whose result does not depend on how
// they are computed are written so: conversions between float32 and bfloat16 (exact one way, rounded to
// nearest even the other, as ATen rounds), a sum or product of two values rounded once to the dtype, max(0, x),
// and the WKV and LIF kernels' own loops (wkv_step_cpu, lif_step_cpu). LayerNorm, the token-shift mix
// (addcmul), exp and sigmoid stay ATen's, as the modules compute them.
//
// At batch 64 these passes are bound by memory, not arithmetic: the products between two of them stream megabytes
// of weights through the caches, so what a pass reads and writes mostly comes from and goes to memory. So the loops
// read the activations in their own dtype (D below) rather than from float32 copies, write each result once into
// memory that is not zeroed first (cpu_floats::Floats), split the elements over the threads when they are many,
// and every intermediate is freed as soon as it has been used (see run_blocks). On the Intel Xeon of
// BENCHMARKS.md the 216M step at batch 64 took 62.6 - 69.3 ms with the loops of before (float32 copies, one
// thread) and 54.9 - 56.4 ms with these, against 54.3 - 56.0 ms with ATen's ops in their place (four runs of each,
// alternating); at batch 1 29.0 - 29.6 ms against 29.6 - 29.8 ms before (three runs of each).

// The step's activations are float32 or bfloat16: x's dtype, which every product and ATen op of the step returns.
// D below is one of these two descriptions of it; the loops read its elements as float32 (widen, exact) and round
// their results once to it (round). The conversions are written here rather than taken from c10::BFloat16 so that
// they are compiled with this file's floating-point flags: GCC does not inline a function compiled with
// -ffast-math (the headers) into one compiled without, and a call per element keeps a loop from vectorising.
struct Float32 {
  using Element = float;
  static constexpr at::ScalarType dtype = torch::kFloat32;
  static float widen(float v) { return v; }
  static float round(float v) { return v; }
};
struct BFloat16 {
  using Element = uint16_t;  // the bits: the upper half of the float32
  static constexpr at::ScalarType dtype = torch::kBFloat16;
  static float widen(uint16_t bits) {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  // to nearest, ties to even; NaN to the quiet NaN 0x7fc0 (as c10::BFloat16 rounds)
  static uint16_t round(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    const uint16_t rounded = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7fffffffu) > 0x7f800000u ? uint16_t{0x7fc0} : rounded;
  }
};

// Elements per thread below which a second thread costs more than it saves (waking one costs microseconds).
constexpr int64_t kMinElementsPerThread = 1 << 14;

// body(i) for every i in [begin, end), compiled for AVX-512, AVX2 and the baseline (cpu_clones.h) with body inlined
// into each; every clone runs the same IEEE operations (no FMA: fp-contract is off), so the same bits. Built for the
// baseline alone, the loops ran on SSE2's four lanes: on the Intel Xeon of BENCHMARKS.md, at batch 64 of the 216M
// model on one thread, they took 11.1 % of the step's samples (perf) and the step 80.7 - 82.3 ms, against 8.3 % and
// 75.7 - 80.9 ms with the clones (three alternating pairs; on two threads 44.0 - 45.7 against 43.4 - 47.4 ms).
template <typename F>
CPU_CLONES void each_element(int64_t begin, int64_t end, const F& body) {
  for (int64_t i = begin; i < end; ++i) body(i);
}

// body(i) for every i in [0, n), the range split over the threads when it is large. Each element's result
// depends on that element alone, so the split changes no value.
template <typename F>
void over_elements(int64_t n, const F& body) {
  at::parallel_for(0, n, kMinElementsPerThread, [&](int64_t begin, int64_t end) { each_element(begin, end, body); });
}

// The elements of `t`, a contiguous tensor of the step's dtype D, to write (a new_tensor's) ...
template <typename D>
typename D::Element* elements_to_write(const torch::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.is_contiguous() && t.scalar_type() == D::dtype);
  return static_cast<typename D::Element*>(t.data_ptr());
}

// ... or to read.
template <typename D>
const typename D::Element* elements(const torch::Tensor& t) {
  return elements_to_write<D>(t);
}

// A new tensor of `sizes` in the step's dtype D, not initialised.
template <typename D>
torch::Tensor new_tensor(at::IntArrayRef sizes) {
  return torch::empty(sizes, torch::TensorOptions().dtype(D::dtype));
}

// fn(i) for every element i, rounded once to D, in a new tensor of `sizes`.
template <typename D, typename F>
torch::Tensor tensor_from(at::IntArrayRef sizes, const F& fn) {
  auto out = new_tensor<D>(sizes);
  auto* dst = elements_to_write<D>(out);
  over_elements(out.numel(), [&](int64_t i) { dst[i] = D::round(fn(i)); });
  return out;
}

// The float32 values of `t` (of the step's dtype D) written to dst.
template <typename D>
void widen_into(const torch::Tensor& t, float* dst) {
  const auto* src = elements<D>(t);
  over_elements(t.numel(), [&](int64_t i) { dst[i] = D::widen(src[i]); });
}

// The values of `t` as a float32 array: t's own memory where D is float32, else widened into `copy`.
template <typename D>
const float* float32_values(const torch::Tensor& t, Floats& copy) {
  if constexpr (std::is_same_v<D, Float32>) {
    return elements<Float32>(t);
  } else {
    copy.resize(t.numel());
    widen_into<D>(t, copy.data());
    return copy.data();
  }
}

// square(relu(k)) in D: max(0, k) exact, the square rounded once.
template <typename D>
torch::Tensor squared_relu(const torch::Tensor& k) {
  const auto* values = elements<D>(k);
  return tensor_from<D>(k.sizes(), [&](int64_t i) {
    const float value = D::widen(values[i]);
    const float positive = value < 0.0f ? 0.0f : value;
    return positive * positive;
  });
}

// a * b in D, rounded once.
template <typename D>
torch::Tensor times(const torch::Tensor& a, const torch::Tensor& b) {
  const auto *x = elements<D>(a), *y = elements<D>(b);
  return tensor_from<D>(a.sizes(), [&](int64_t i) { return D::widen(x[i]) * D::widen(y[i]); });
}

// The LIF layer along one token: the spikes (0 or 1) of `input` from the membrane v0 (nullopt: at rest,
// v_reset) into `spikes`; the membrane after it into `membrane`.
template <typename D>
void fire(const torch::Tensor& input, const std::optional<torch::Tensor>& v0, torch::Tensor& membrane,
          const double* settings, Floats& spikes) {
  Floats copy, rest;
  const float* x = float32_values<D>(input, copy);
  const int64_t n = input.numel();
  const float* start;
  torch::Tensor carried;
  if (v0) {
    carried = contiguous(*v0);
    start = carried.data_ptr<float>();
  } else {
    rest.assign(n, static_cast<float>(settings[2]));
    start = rest.data();
  }
  membrane = torch::empty(input.sizes(), torch::TensorOptions().dtype(torch::kFloat32));
  spikes.resize(n);
  lif_step_cpu(x, start, spikes.data(), membrane.data_ptr<float>(), n, settings[0], settings[1], settings[2]);
}

// x + LIF(input): the residual stream after a spiking layer, in x's dtype (`x + spikes`, rounded once).
template <typename D>
torch::Tensor add_fired(const torch::Tensor& x, const torch::Tensor& input, const std::optional<torch::Tensor>& v0,
                        torch::Tensor& membrane, const double* settings) {
  Floats spikes;
  fire<D>(input, v0, membrane, settings, spikes);
  const auto* xs = elements<D>(x);
  const float* s = spikes.data();
  return tensor_from<D>(x.sizes(), [&](int64_t i) { return D::widen(xs[i]) + s[i]; });
}

// One call's view of its inputs and outputs, block by block.
struct Step {
  const Tensors& tensors;
  const std::vector<int64_t>& kernels;
  const std::vector<int64_t>& lora_kernels;
  const std::vector<int64_t>& gates;
  const std::vector<double>& scalars;
  const Tensors& membranes;
  std::vector<torch::Tensor>& next_membranes;
  std::vector<torch::Tensor>& gated;
  bool record;
  int64_t block = 0;

  const torch::Tensor& get(int64_t slot) const {
    const auto& value = tensors[block * kSlots + slot];
    TORCH_CHECK(value.has_value(), "decode_blocks: tensor ", slot, " of block ", block, " is missing");
    return *value;
  }
  bool has(int64_t slot) const { return tensors[block * kSlots + slot].has_value(); }

  // x W^T through the kernel the layer chose (the streaming kernel with int8 weights and their scale or
  // bfloat16 ones, the AMX kernel, or ATen's product); plus the adapter's s * B (S(A x) * A x) (S = 1 without gate),
  // A and B in x's dtype through the kernel the adapter chose (the streaming kernel or ATen's product). x and the
  // result are of the step's dtype D.
  template <typename D>
  torch::Tensor product(Product p, const torch::Tensor& x) {
    const int64_t slot = kProductSlots + p * kTensorsPerProduct, index = block * kProducts + p;
    const auto& w = get(slot);
    torch::Tensor out;
    if (kernels[index] == kAten) {
      out = at::linear(x, w);
    } else if (kernels[index] == kAmx) {
      out = amx_linear_cpu(x, get(slot + 2), w.size(0), std::nullopt);
    } else if (!has(slot + 1)) {
      out = stream_linear_cpu(x, w, std::nullopt, std::nullopt, "auto");
    } else if (x.scalar_type() == torch::kBFloat16) {  // Int8Linear: bfloat16 rows in
      out = stream_linear_cpu(x, w, get(slot + 1), std::nullopt, "auto");
    } else {  // the same, the result back in x's dtype
      out = stream_linear_cpu(x.to(torch::kBFloat16), w, get(slot + 1), std::nullopt, "auto").to(x.scalar_type());
    }
    if (!has(slot + 3)) return out;
    const auto lora = [&](const torch::Tensor& input, int64_t matrix) {
      const auto w = get(matrix).to(input.scalar_type());
      return lora_kernels[index] == kStream ? stream_linear_cpu(input, w, std::nullopt, std::nullopt, "auto")
                                            : at::linear(input, w);
    };
    const double* s = &scalars[index * kProductScalars];
    auto a = lora(x, slot + 3);
    const int64_t neuron = block * kNeurons + p;
    if (gates[index] != kNoGate) {
      // temporal: the carried membrane; pointwise: from rest at every token, nothing carried
      torch::Tensor v_last;
      Floats spikes;
      fire<D>(a, gates[index] == kTemporal ? membranes[neuron] : std::nullopt, v_last, s + 1, spikes);
      const auto* down = elements<D>(a);
      const float* fired = spikes.data();
      a = tensor_from<D>(a.sizes(), [&](int64_t i) { return fired[i] * D::widen(down[i]); });
      if (gates[index] == kTemporal) next_membranes[neuron] = v_last;
      if (record) gated[index] = a;
    }
    // out + B(...) * scaling as the module computes it, the product by the scaling rounded to D and then the sum,
    // in one pass rather than ATen's two (each an allocation and a pass over the layer's outputs): on the Intel Xeon
    // of BENCHMARKS.md the bf16 216M step with SpikeLoRA r 8 on every block layer took 46.9 - 48.4 ms so at 64 rows
    // against 49.9 - 51.9 ms (four alternating pairs of processes), 16.4 - 17.3 against 17.4 - 17.6 ms at batch 1.
    const auto update = lora(a, slot + 4);
    const auto *base = elements<D>(out), *added = elements<D>(update);
    const float scaling = static_cast<float>(s[0]);  // as ATen takes a double scalar into a float32 or bf16 product
    return tensor_from<D>(out.sizes(), [&](int64_t i) {
      return D::widen(base[i]) + D::widen(D::round(D::widen(added[i]) * scaling));
    });
  }
};

torch::Tensor mix(const torch::Tensor& previous, const torch::Tensor& mu, const torch::Tensor& delta) {
  // y * mu + previous * (1 - mu) as shift_mix computes it for one token: previous + mu * (y - previous), mu [C]
  return at::addcmul(previous, mu, delta);
}

}  // namespace

// x: [B, C] after the embedding; tensors: kSlots per block; per product of every block: its Kernel, its adapter's
// Kernel (kStream or kAten), gate (Gate), kProductScalars scalars; att_shift, ffn_shift: [L, B, C] float32;
// wkv: [L, B, 3, C] float32; membranes: kNeurons per block, [B, width] float32 or None (at rest); lif:
// kLifSettings per block; record: also return each gate's S(A x) * A x. Returns x after the blocks, the next
// att_shift, ffn_shift and wkv, the kNeurons L membranes after the token (undefined for neurons that carry
// nothing), then, with record, the kProducts L gated activations (undefined without gate). The inputs are
// not changed; into: empty, or the tensors (not overlapping the state) to write the next att_shift, ffn_shift
// and wkv into.
std::vector<torch::Tensor> decode_blocks_cpu(torch::Tensor x, Tensors tensors, std::vector<int64_t> kernels,
                                             std::vector<int64_t> lora_kernels,
                                             std::vector<int64_t> gates, std::vector<double> scalars,
                                             torch::Tensor att_shift, torch::Tensor ffn_shift, torch::Tensor wkv,
                                             Tensors membranes, std::vector<double> lif, double eps, bool record,
                                             std::vector<torch::Tensor> into) {
  const int64_t L = att_shift.size(0), B = x.size(0), C = x.size(1);
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "decode_blocks: x must be [B, C] on the CPU");
  const auto n = [](const auto& v) { return static_cast<int64_t>(v.size()); };
  TORCH_CHECK(n(tensors) == L * kSlots && n(kernels) == L * kProducts && n(lora_kernels) == L * kProducts &&
                  n(gates) == L * kProducts && n(scalars) == L * kProducts * kProductScalars &&
                  n(membranes) == L * kNeurons && n(lif) == L * kLifSettings,
              "decode_blocks: ", L, " blocks need ", L * kSlots, " tensors, ", L * kProducts,
              " product kernels, adapter kernels and gates, ", L * kProducts * kProductScalars, " product scalars, ",
              L * kNeurons, " membranes and ", L * kLifSettings, " LIF settings");
  TORCH_CHECK(att_shift.sizes() == ffn_shift.sizes() && att_shift.dim() == 3 && att_shift.size(1) == B &&
                  att_shift.size(2) == C && wkv.dim() == 4 && wkv.size(0) == L && wkv.size(1) == B &&
                  wkv.size(2) == 3 && wkv.size(3) == C,
              "decode_blocks: the state does not match x [", B, ", ", C, "]");
  TORCH_CHECK(att_shift.scalar_type() == torch::kFloat32 && ffn_shift.scalar_type() == torch::kFloat32 &&
                  wkv.scalar_type() == torch::kFloat32 && att_shift.device().is_cpu() &&
                  ffn_shift.device().is_cpu() && wkv.device().is_cpu(),
              "decode_blocks: the state must be float32 CPU tensors");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16, "decode_blocks: x must be float32 or bfloat16");
  // The next shifts and WKV state: into the caller's tensors where given (a decoding loop's spare state, which
  // spares it 18 MB of fresh memory per step at batch 64 of the 216M model), else new tensors.
  TORCH_CHECK(into.empty() || into.size() == 3, "decode_blocks: into holds att_shift, ffn_shift and wkv, or nothing");
  const std::vector<torch::Tensor> state{att_shift, ffn_shift, wkv};
  for (size_t k = 0; k < into.size(); ++k) {
    TORCH_CHECK(into[k].sizes() == state[k].sizes() && into[k].scalar_type() == state[k].scalar_type() &&
                    into[k].device().is_cpu() && into[k].is_contiguous(),
                "decode_blocks: into[", k, "] must be a contiguous CPU tensor like the state's");
    const auto apart = [&](const torch::Tensor& other) {
      return at::get_overlap_status(into[k], other) == at::MemOverlapStatus::No;
    };
    bool separate = true;
    for (const auto& input : state) separate = separate && apart(input);
    for (size_t j = 0; j < k; ++j) separate = separate && apart(into[j]);
    TORCH_CHECK(separate, "decode_blocks: into[", k, "] overlaps the state or another of into's tensors");
  }
  auto att_next = into.empty() ? torch::empty(att_shift.sizes(), att_shift.options()) : into[0];
  auto ffn_next = into.empty() ? torch::empty(ffn_shift.sizes(), ffn_shift.options()) : into[1];
  auto wkv_next = into.empty() ? torch::empty(wkv.sizes(), wkv.options()) : into[2];
  const auto att_in = contiguous(att_shift), ffn_in = contiguous(ffn_shift), wkv_in = contiguous(wkv);
  std::vector<torch::Tensor> next_membranes(L * kNeurons), gated(record ? L * kProducts : 0);
  Step step{tensors, kernels, lora_kernels, gates, scalars, membranes, next_membranes, gated, record};
  const std::vector<int64_t> normalized{C}, rows{B, C};
  const int64_t row = B * C;
  // The blocks, with activations of the step's dtype D.
  const auto run_blocks = [&](auto dtype) {
    using D = decltype(dtype);
    // Block i's token shift: LayerNorm(x) (written to shift_out as the next token's shift), and from it and the
    // previous token's shift (in D) what the mixes take: previous and LayerNorm(x) - previous (rounded once, as
    // ATen's subtraction computes it). The three in one pass over the elements rather than a widening, a rounding and
    // ATen's subtraction.
    const auto shifted = [&](int64_t i, Slot ln_weight, Slot ln_bias, const torch::Tensor& shift_in,
                             torch::Tensor& shift_out) {
      const auto y = at::layer_norm(x, normalized, step.get(ln_weight), step.get(ln_bias), eps);
      const auto* normed = elements<D>(y);
      const float* before = shift_in.data_ptr<float>() + i * row;
      float* after = shift_out.data_ptr<float>() + i * row;
      auto previous = new_tensor<D>(rows), delta = new_tensor<D>(rows);
      auto *last = elements_to_write<D>(previous), *change = elements_to_write<D>(delta);
      over_elements(row, [&](int64_t j) {
        const float value = D::widen(normed[j]);
        after[j] = value;
        last[j] = D::round(before[j]);
        change[j] = D::round(value - D::widen(last[j]));
      });
      return std::make_pair(previous, delta);
    };
    // Block i's WKV of one token, sigmoid(r) * wkv(k, v) in D (the input of att.output), the state advanced into
    // wkv_next. k, v, r and their float32 copies are freed on return.
    const auto attend = [&](int64_t i, const torch::Tensor& previous, const torch::Tensor& delta) {
      const auto k = step.product<D>(kAttKey, mix(previous, step.get(kAttMixK), delta));
      const auto v = step.product<D>(kAttValue, mix(previous, step.get(kAttMixV), delta));
      const auto r = step.product<D>(kAttReceptance, mix(previous, step.get(kAttMixR), delta));
      // w = -exp(time_decay), the negation exact
      const auto decay = floats_of(at::exp(step.get(kTimeDecay).to(torch::kFloat32)));
      Floats w(C), k_copy, v_copy, r_copy, out(row);
      for (int64_t c = 0; c < C; ++c) w[c] = -decay[c];
      const auto u = floats_of(step.get(kTimeFirst));
      wkv_step_cpu(w.data(), u.data(), float32_values<D>(k, k_copy), float32_values<D>(v, v_copy),
                   float32_values<D>(r, r_copy), wkv_in.data_ptr<float>() + i * 3 * row,
                   wkv_next.data_ptr<float>() + i * 3 * row, out.data(), B, C);
      const float* attended = out.data();
      return tensor_from<D>(rows, [&](int64_t j) { return attended[j]; });
    };
    // Each intermediate is freed as soon as it has been used (the scopes below): at batch 64, memory that the
    // allocator hands out again while it is still in the caches spares the products reading their inputs from
    // memory (ffn.value's products of the 216M model took 17.6 ms per step with ffn.key's result held to the end
    // of the block, 13.5 ms without).
    for (int64_t i = 0; i < L; ++i) {
      step.block = i;
      const double* lif1 = &lif[i * kLifSettings];
      const double* lif2 = lif1 + 3;
      const int64_t neurons = i * kNeurons + kProducts;
      if (step.has(kLn0Weight)) x = at::layer_norm(x, normalized, step.get(kLn0Weight), step.get(kLn0Bias), eps);
      {  // time mix
        const auto [previous, delta] = shifted(i, kLn1Weight, kLn1Bias, att_in, att_next);
        const auto mixed = step.product<D>(kAttOutput, attend(i, previous, delta));
        x = add_fired<D>(x, mixed, membranes[neurons], next_membranes[neurons], lif1);
      }
      {  // channel mix
        const auto [previous, delta] = shifted(i, kLn2Weight, kLn2Bias, ffn_in, ffn_next);
        torch::Tensor value;
        {
          const auto key = squared_relu<D>(step.product<D>(kFfnKey, mix(previous, step.get(kFfnMixK), delta)));
          value = step.product<D>(kFfnValue, key);
        }
        const auto gate = at::sigmoid(step.product<D>(kFfnReceptance, mix(previous, step.get(kFfnMixR), delta)));
        x = add_fired<D>(x, times<D>(gate, value), membranes[neurons + 1], next_membranes[neurons + 1], lif2);
      }
    }
  };
  x = contiguous(x);
  if (dtype == torch::kBFloat16) {
    run_blocks(BFloat16());
  } else {
    run_blocks(Float32());
  }
  std::vector<torch::Tensor> out{x, att_next, ffn_next, wkv_next};
  out.insert(out.end(), next_membranes.begin(), next_membranes.end());
  out.insert(out.end(), gated.begin(), gated.end());
  return out;
}
