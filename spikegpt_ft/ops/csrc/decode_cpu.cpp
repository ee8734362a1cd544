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

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "cpu_floats.h"

// The loops below must round as the ATen ops they stand for: no FMA contraction or other fast-math rewriting
// (the extension is built with -ffast-math; see lif_cpu.cpp).
#pragma GCC optimize("no-fast-math", "fp-contract=off")

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
using cpu_floats::floats_of;
using cpu_floats::write_floats;

// The elementwise steps between the products are written as loops over raw arrays, not ATen ops: at batch 1
// each ATen op costs microseconds of dispatch and allocation, several times the arithmetic of a 768-wide row,
// and a step has hundreds (BENCHMARKS.md, "step overhead"). Only steps whose result does not depend on how
// they are computed are written so: conversions between float32 and bfloat16 (exact one way, rounded to
// nearest even the other, as ATen rounds), a sum or product of two values rounded once to the dtype, max(0, x),
// and the WKV and LIF kernels' own loops (wkv_step_cpu, lif_step_cpu). LayerNorm, the token-shift mix
// (addcmul), exp and sigmoid stay ATen's, as the modules compute them.

// fn(i) for every element i, written into a new tensor of `dtype` (float32 or bfloat16) and `sizes`.
template <typename F>
torch::Tensor tensor_from(at::IntArrayRef sizes, at::ScalarType dtype, const F& fn) {
  auto out = torch::empty(sizes, torch::TensorOptions().dtype(dtype));
  const int64_t n = out.numel();
  if (dtype == torch::kBFloat16) {
    auto* dst = out.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < n; ++i) dst[i] = at::BFloat16(fn(i));
  } else {
    auto* dst = out.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) dst[i] = fn(i);
  }
  return out;
}

// The LIF layer along one token: the spikes (0 or 1) of `input` from the membrane v0 (nullopt: at rest,
// v_reset), as float32; the membrane after it into `membrane`.
std::vector<float> fire(const torch::Tensor& input, const std::optional<torch::Tensor>& v0, torch::Tensor& membrane,
                        const double* settings) {
  const auto x = floats_of(input);
  const int64_t n = static_cast<int64_t>(x.size());
  std::vector<float> rest, spikes(n);
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
  lif_step_cpu(x.data(), start, spikes.data(), membrane.data_ptr<float>(), n, settings[0], settings[1], settings[2]);
  return spikes;
}

// x + LIF(input): the residual stream after a spiking layer, in x's dtype (`x + spikes`, rounded once).
torch::Tensor add_fired(const torch::Tensor& x, const torch::Tensor& input, const std::optional<torch::Tensor>& v0,
                        torch::Tensor& membrane, const double* settings) {
  const auto spikes = fire(input, v0, membrane, settings);
  const auto xs = floats_of(x);
  return tensor_from(x.sizes(), x.scalar_type(), [&](int64_t i) { return xs[i] + spikes[i]; });
}

// One call's view of its inputs and outputs, block by block.
struct Step {
  const Tensors& tensors;
  const std::vector<int64_t>& kernels;
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
  // bfloat16 ones, the AMX kernel, or ATen's product); plus the adapter's s * B (S(A x) * A x) (S = 1 without gate).
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
    const double* s = &scalars[index * kProductScalars];
    auto a = at::linear(x, get(slot + 3).to(x.scalar_type()));
    const int64_t neuron = block * kNeurons + p;
    if (gates[index] != kNoGate) {
      // temporal: the carried membrane; pointwise: from rest at every token, nothing carried
      torch::Tensor v_last;
      const auto spikes = fire(a, gates[index] == kTemporal ? membranes[neuron] : std::nullopt, v_last, s + 1);
      const auto down = floats_of(a);
      a = tensor_from(a.sizes(), a.scalar_type(), [&](int64_t i) { return spikes[i] * down[i]; });
      if (gates[index] == kTemporal) next_membranes[neuron] = v_last;
      if (record) gated[index] = a;
    }
    return out + at::linear(a, get(slot + 4).to(x.scalar_type())) * s[0];
  }
};

torch::Tensor mix(const torch::Tensor& previous, const torch::Tensor& mu, const torch::Tensor& delta) {
  // y * mu + previous * (1 - mu) as shift_mix computes it for one token: previous + mu * (y - previous), mu [C]
  return at::addcmul(previous, mu, delta);
}

}  // namespace

// x: [B, C] after the embedding; tensors: kSlots per block; per product of every block: its Kernel, gate (Gate),
// kProductScalars scalars; att_shift, ffn_shift: [L, B, C] float32;
// wkv: [L, B, 3, C] float32; membranes: kNeurons per block, [B, width] float32 or None (at rest); lif:
// kLifSettings per block; record: also return each gate's S(A x) * A x. Returns x after the blocks, the next
// att_shift, ffn_shift and wkv, the kNeurons L membranes after the token (undefined for neurons that carry
// nothing), then, with record, the kProducts L gated activations (undefined without gate). The inputs are
// not changed; into: empty, or the tensors (not overlapping the state) to write the next att_shift, ffn_shift
// and wkv into.
std::vector<torch::Tensor> decode_blocks_cpu(torch::Tensor x, Tensors tensors, std::vector<int64_t> kernels,
                                             std::vector<int64_t> gates, std::vector<double> scalars,
                                             torch::Tensor att_shift, torch::Tensor ffn_shift, torch::Tensor wkv,
                                             Tensors membranes, std::vector<double> lif, double eps, bool record,
                                             std::vector<torch::Tensor> into) {
  const int64_t L = att_shift.size(0), B = x.size(0), C = x.size(1);
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "decode_blocks: x must be [B, C] on the CPU");
  const auto n = [](const auto& v) { return static_cast<int64_t>(v.size()); };
  TORCH_CHECK(n(tensors) == L * kSlots && n(kernels) == L * kProducts && n(gates) == L * kProducts &&
                  n(scalars) == L * kProducts * kProductScalars && n(membranes) == L * kNeurons &&
                  n(lif) == L * kLifSettings,
              "decode_blocks: ", L, " blocks need ", L * kSlots, " tensors, ", L * kProducts, " product kernels and gates, ",
              L * kProducts * kProductScalars, " product scalars, ", L * kNeurons, " membranes and ",
              L * kLifSettings, " LIF settings");
  TORCH_CHECK(att_shift.sizes() == ffn_shift.sizes() && att_shift.dim() == 3 && att_shift.size(1) == B &&
                  att_shift.size(2) == C && wkv.dim() == 4 && wkv.size(0) == L && wkv.size(1) == B &&
                  wkv.size(2) == 3 && wkv.size(3) == C,
              "decode_blocks: the state does not match x [", B, ", ", C, "]");
  TORCH_CHECK(att_shift.scalar_type() == torch::kFloat32 && ffn_shift.scalar_type() == torch::kFloat32 &&
                  wkv.scalar_type() == torch::kFloat32 && att_shift.device().is_cpu() &&
                  ffn_shift.device().is_cpu() && wkv.device().is_cpu(),
              "decode_blocks: the state must be float32 CPU tensors");
  const auto dtype = x.scalar_type();
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
  Step step{tensors, kernels, gates, scalars, membranes, next_membranes, gated, record};
  const std::vector<int64_t> normalized{C}, rows{B, C};
  const int64_t row = B * C;
  // block i's shift of the previous token in x's dtype, and the one after it written from y
  const auto previous_of = [&](const torch::Tensor& shift, int64_t i) {
    const float* p = shift.data_ptr<float>() + i * row;
    return tensor_from(rows, dtype, [&](int64_t j) { return p[j]; });
  };
  const auto keep = [&](torch::Tensor& next, int64_t i, const torch::Tensor& y) {
    write_floats(y, next.data_ptr<float>() + i * row);
  };
  for (int64_t i = 0; i < L; ++i) {
    step.block = i;
    const double* lif1 = &lif[i * kLifSettings];
    const double* lif2 = lif1 + 3;
    if (step.has(kLn0Weight)) x = at::layer_norm(x, normalized, step.get(kLn0Weight), step.get(kLn0Bias), eps);
    // time mix
    const auto y = at::layer_norm(x, normalized, step.get(kLn1Weight), step.get(kLn1Bias), eps);
    const auto previous = previous_of(att_in, i);
    const auto delta = y - previous;
    const auto kf = floats_of(step.product(kAttKey, mix(previous, step.get(kAttMixK), delta)));
    const auto vf = floats_of(step.product(kAttValue, mix(previous, step.get(kAttMixV), delta)));
    const auto rf = floats_of(step.product(kAttReceptance, mix(previous, step.get(kAttMixR), delta)));
    // w = -exp(time_decay), the negation exact
    const auto decay = floats_of(at::exp(step.get(kTimeDecay).to(torch::kFloat32)));
    std::vector<float> w(C), wkv_out(row);
    for (int64_t c = 0; c < C; ++c) w[c] = -decay[c];
    const auto u = floats_of(step.get(kTimeFirst));
    wkv_step_cpu(w.data(), u.data(), kf.data(), vf.data(), rf.data(), wkv_in.data_ptr<float>() + i * 3 * row,
                 wkv_next.data_ptr<float>() + i * 3 * row, wkv_out.data(), B, C);
    const auto mixed = step.product(kAttOutput, tensor_from(rows, dtype, [&](int64_t j) { return wkv_out[j]; }));
    const int64_t neurons = i * kNeurons + kProducts;
    x = add_fired(x, mixed, membranes[neurons], next_membranes[neurons], lif1);
    keep(att_next, i, y);
    // channel mix
    const auto z = at::layer_norm(x, normalized, step.get(kLn2Weight), step.get(kLn2Bias), eps);
    const auto previous2 = previous_of(ffn_in, i);
    const auto delta2 = z - previous2;
    const auto k_lin = floats_of(step.product(kFfnKey, mix(previous2, step.get(kFfnMixK), delta2)));
    // square(relu(k)): max(0, k) exact, the square rounded once to the dtype
    const auto key = tensor_from({B, static_cast<int64_t>(k_lin.size()) / B}, dtype, [&](int64_t j) {
      const float positive = std::max(k_lin[j], 0.0f);
      return positive * positive;
    });
    const auto gate = floats_of(at::sigmoid(step.product(kFfnReceptance, mix(previous2, step.get(kFfnMixR), delta2))));
    const auto value = floats_of(step.product(kFfnValue, key));
    const auto channel = tensor_from(rows, dtype, [&](int64_t j) { return gate[j] * value[j]; });
    x = add_fired(x, channel, membranes[neurons + 1], next_membranes[neurons + 1], lif2);
    keep(ffn_next, i, z);
  }
  std::vector<torch::Tensor> out{x, att_next, ffn_next, wkv_next};
  out.insert(out.end(), next_membranes.begin(), next_membranes.end());
  out.insert(out.end(), gated.begin(), gated.end());
  return out;
}
