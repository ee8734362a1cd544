// One recurrent step (one token per sequence) through a stack of SpikeGPT blocks, in one call.
//
// Why hand-written: at batch 1 a step is a few hundred tiny operations, and from Python each costs a few
// microseconds of interpreter and module dispatch, more than the arithmetic of a narrow model and a large
// part of a wide one's step (BENCHMARKS.md). Here the same operations run from C++: the same ATen ops
// and the same kernels (WKV, LIF, streaming product) on the same dtypes in the same order as the modules
// of spikegpt_ft/model/spikegpt.py, so the results are bitwise those of the module path
// (tests/test_decode_step.py checks it). A linear layer may carry a LoRA or SpikeLoRA adapter (its gate a
// temporal or a pointwise LIF), computed as spikegpt_ft/adapters/layer.py does. The Python side
// (spikegpt_ft/ops/decode.py) decides when this path applies and lays out the tensors; the layout of one
// block is `Slot` below.
#include <torch/extension.h>
#include <ATen/MemoryOverlap.h>

#include <optional>
#include <string>
#include <vector>

std::vector<torch::Tensor> wkv_forward_cpu(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                           std::optional<torch::Tensor> r, torch::Tensor state, int64_t chunk_len);
std::vector<torch::Tensor> lif_forward_cpu(torch::Tensor x, torch::Tensor v0, double tau, double v_threshold,
                                           double v_reset);
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

// The membrane a neuron starts the token from: the carried one, or v_reset for a neuron at rest.
torch::Tensor membrane_or_rest(const std::optional<torch::Tensor>& membrane, double v_reset, int64_t B, int64_t C) {
  return membrane ? membrane->contiguous() : at::full({B, C}, v_reset, torch::kFloat32);
}

// The LIF layer along one token from membrane v0: spikes in x's dtype; the membrane it ends with in `membrane`.
torch::Tensor fire(const torch::Tensor& x, const torch::Tensor& v0, torch::Tensor& membrane, const double* settings) {
  auto out = lif_forward_cpu(x.to(torch::kFloat32).unsqueeze(0).contiguous(), v0, settings[0], settings[1], settings[2]);
  membrane = out[1];
  return out[0].squeeze(0).to(x.scalar_type());
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
    } else {  // Int8Linear: bfloat16 rows in, the result back in x's dtype
      out = stream_linear_cpu(x.to(torch::kBFloat16), w, get(slot + 1), std::nullopt, "auto").to(x.scalar_type());
    }
    if (!has(slot + 3)) return out;
    const double* s = &scalars[index * kProductScalars];
    auto a = at::linear(x, get(slot + 3).to(x.scalar_type()));
    const int64_t neuron = block * kNeurons + p;
    if (gates[index] != kNoGate) {
      // temporal: the carried membrane; pointwise: from rest at every token, nothing carried
      const auto v0 = gates[index] == kTemporal ? membrane_or_rest(membranes[neuron], s[3], a.size(0), a.size(1))
                                                : at::full({a.size(0), a.size(1)}, s[3], torch::kFloat32);
      torch::Tensor v_last;
      a = fire(a, v0, v_last, s + 1) * a;
      if (gates[index] == kTemporal) next_membranes[neuron] = v_last;
      if (record) gated[index] = a;
    }
    return out + at::linear(a, get(slot + 4).to(x.scalar_type())) * s[0];
  }
};

torch::Tensor mix(const torch::Tensor& previous, const torch::Tensor& mu, const torch::Tensor& delta) {
  // y * mu + previous * (1 - mu) as shift_mix computes it for one token: previous + mu * (y - previous)
  return at::addcmul(previous, mu.reshape({-1}), delta);
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
  auto att_next = into.empty() ? torch::empty_like(att_shift) : into[0];
  auto ffn_next = into.empty() ? torch::empty_like(ffn_shift) : into[1];
  auto wkv_next = into.empty() ? torch::empty_like(wkv) : into[2];
  std::vector<torch::Tensor> next_membranes(L * kNeurons), gated(record ? L * kProducts : 0);
  Step step{tensors, kernels, gates, scalars, membranes, next_membranes, gated, record};
  const std::vector<int64_t> normalized{C};
  for (int64_t i = 0; i < L; ++i) {
    step.block = i;
    const double* lif1 = &lif[i * kLifSettings];
    const double* lif2 = lif1 + 3;
    if (step.has(kLn0Weight)) x = at::layer_norm(x, normalized, step.get(kLn0Weight), step.get(kLn0Bias), eps);
    // time mix
    const auto y = at::layer_norm(x, normalized, step.get(kLn1Weight), step.get(kLn1Bias), eps);
    const auto previous = att_shift[i].to(dtype);
    const auto delta = y - previous;
    const auto k = step.product(kAttKey, mix(previous, step.get(kAttMixK), delta));
    const auto v = step.product(kAttValue, mix(previous, step.get(kAttMixV), delta));
    const auto r = step.product(kAttReceptance, mix(previous, step.get(kAttMixR), delta));
    const auto w = -at::exp(step.get(kTimeDecay).to(torch::kFloat32)).contiguous();
    const auto u = step.get(kTimeFirst).to(torch::kFloat32).contiguous();
    auto as_seq = [&](const torch::Tensor& t) { return t.to(torch::kFloat32).view({B, 1, C}).contiguous(); };
    const auto wkv_out = wkv_forward_cpu(w, u, as_seq(k), as_seq(v), as_seq(r), wkv[i].contiguous(), 0);
    wkv_next[i].copy_(wkv_out[2]);
    const auto mixed = step.product(kAttOutput, wkv_out[3].view({B, C}).to(dtype));
    const int64_t neurons = i * kNeurons + kProducts;
    x = x + fire(mixed, membrane_or_rest(membranes[neurons], lif1[2], B, C), next_membranes[neurons], lif1);
    att_next[i].copy_(y);
    // channel mix
    const auto z = at::layer_norm(x, normalized, step.get(kLn2Weight), step.get(kLn2Bias), eps);
    const auto previous2 = ffn_shift[i].to(dtype);
    const auto delta2 = z - previous2;
    const auto key = at::square(at::relu(step.product(kFfnKey, mix(previous2, step.get(kFfnMixK), delta2))));
    const auto gate = at::sigmoid(step.product(kFfnReceptance, mix(previous2, step.get(kFfnMixR), delta2)));
    const auto channel = gate * step.product(kFfnValue, key);
    x = x + fire(channel, membrane_or_rest(membranes[neurons + 1], lif2[2], B, C), next_membranes[neurons + 1], lif2);
    ffn_next[i].copy_(z);
  }
  std::vector<torch::Tensor> out{x, att_next, ffn_next, wkv_next};
  out.insert(out.end(), next_membranes.begin(), next_membranes.end());
  out.insert(out.end(), gated.begin(), gated.end());
  return out;
}
