// One recurrent step (one token per sequence) through a stack of SpikeGPT blocks, in one call.
//
// Why hand-written: at batch 1 a step is a few hundred tiny operations, and from Python each costs a few
// microseconds of interpreter and module dispatch, more than the arithmetic of a narrow model and a large
// part of a wide one's step (BENCHMARKS.md). Here the same operations run from C++: the same ATen ops
// and the same kernels (WKV, LIF, streaming product) on the same dtypes in the same order as the modules
// of spikegpt_ft/model/spikegpt.py, so the results are bitwise those of the module path
// (tests/test_decode_step.py checks it). The Python side (spikegpt_ft/ops/decode.py) decides when this
// path applies and lays out the tensors; the layout of one block is `Slot` below.
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

std::vector<torch::Tensor> wkv_forward_cpu(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                           std::optional<torch::Tensor> r, torch::Tensor state, int64_t chunk_len);
std::vector<torch::Tensor> lif_forward_cpu(torch::Tensor x, torch::Tensor v0, double tau, double v_threshold,
                                           double v_reset);
torch::Tensor stream_linear_cpu(torch::Tensor x, torch::Tensor weight, std::optional<torch::Tensor> scale,
                                std::optional<torch::Tensor> bias, const std::string& kernel);

namespace {

// The tensors of one block, in this order (None where a block has no such tensor: ln0 after block 0,
// the scales of bfloat16 or float32 weights).
enum Slot : int64_t {
  kLn0Weight, kLn0Bias, kLn1Weight, kLn1Bias, kLn2Weight, kLn2Bias,
  kAttMixK, kAttMixV, kAttMixR, kTimeDecay, kTimeFirst,
  kAttKey, kAttKeyScale, kAttValue, kAttValueScale, kAttReceptance, kAttReceptanceScale, kAttOutput, kAttOutputScale,
  kFfnMixK, kFfnMixR, kFfnKey, kFfnKeyScale, kFfnReceptance, kFfnReceptanceScale, kFfnValue, kFfnValueScale,
  kSlots
};  // clang-format off
// The products of one block, in the order of their weights above.
constexpr int64_t kProducts = 7;
// The LIF settings of one block: tau, v_threshold, v_reset of lif1, then of lif2.
constexpr int64_t kLifSettings = 6;

using Tensors = std::vector<std::optional<torch::Tensor>>;

const torch::Tensor& get(const Tensors& t, int64_t block, Slot slot) {
  const auto& value = t[block * kSlots + slot];
  TORCH_CHECK(value.has_value(), "decode_blocks: tensor ", static_cast<int64_t>(slot), " of block ", block,
              " is missing");
  return *value;
}

// y = x W^T: the streaming kernel (int8 with its scale, or bfloat16) or ATen's product, as Linear chose.
torch::Tensor product(const Tensors& t, int64_t block, Slot weight, bool stream, const torch::Tensor& x) {
  const auto& scale = t[block * kSlots + weight + 1];
  const auto& w = get(t, block, weight);
  if (!stream) return at::linear(x, w);
  if (!scale) return stream_linear_cpu(x, w, std::nullopt, std::nullopt, "auto");
  // Int8Linear: bfloat16 rows in, the result back in x's dtype
  return stream_linear_cpu(x.to(torch::kBFloat16), w, scale, std::nullopt, "auto").to(x.scalar_type());
}

// y * mu + previous * (1 - mu) as shift_mix computes it for one token: previous + mu * (y - previous).
torch::Tensor mix(const torch::Tensor& previous, const torch::Tensor& mu, const torch::Tensor& delta) {
  return at::addcmul(previous, mu.reshape({-1}), delta);
}

// The LIF layer along one token: spikes in x's dtype; the membrane it ends with in `membrane`.
torch::Tensor fire(const torch::Tensor& x, const torch::Tensor& v0, torch::Tensor& membrane, const double* settings) {
  auto out = lif_forward_cpu(x.to(torch::kFloat32).unsqueeze(0).contiguous(), v0, settings[0], settings[1], settings[2]);
  membrane = out[1];
  return out[0].squeeze(0).to(x.scalar_type());
}

// The membrane a neuron starts the token from: the carried one, or v_reset for a neuron at rest.
torch::Tensor membrane_or_rest(const std::optional<torch::Tensor>& membrane, double v_reset, int64_t B, int64_t C) {
  return membrane ? membrane->contiguous() : at::full({B, C}, v_reset, torch::kFloat32);
}

}  // namespace

// x: [B, C] after the embedding; tensors: kSlots per block; stream: kProducts flags per block (the streaming
// kernel, else ATen's product); att_shift, ffn_shift: [L, B, C] float32; wkv: [L, B, 3, C] float32;
// membranes: two per block [B, C] float32 (None: the neuron is at rest, v_reset); lif: kLifSettings per block.
// Returns x after the blocks, then the next state: att_shift, ffn_shift, wkv and the 2 L membranes. The
// inputs are not changed.
std::vector<torch::Tensor> decode_blocks_cpu(torch::Tensor x, Tensors tensors, std::vector<bool> stream,
                                             torch::Tensor att_shift, torch::Tensor ffn_shift, torch::Tensor wkv,
                                             std::vector<std::optional<torch::Tensor>> membranes,
                                             std::vector<double> lif, double eps) {
  const int64_t L = att_shift.size(0), B = x.size(0), C = x.size(1);
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "decode_blocks: x must be [B, C] on the CPU");
  TORCH_CHECK(static_cast<int64_t>(tensors.size()) == L * kSlots &&
                  static_cast<int64_t>(stream.size()) == L * kProducts &&
                  static_cast<int64_t>(membranes.size()) == 2 * L &&
                  static_cast<int64_t>(lif.size()) == L * kLifSettings,
              "decode_blocks: ", L, " blocks need ", L * kSlots, " tensors, ", L * kProducts, " product flags, ",
              2 * L, " membranes and ", L * kLifSettings, " LIF settings");
  TORCH_CHECK(att_shift.sizes() == ffn_shift.sizes() && att_shift.dim() == 3 && att_shift.size(1) == B &&
                  att_shift.size(2) == C && wkv.dim() == 4 && wkv.size(0) == L && wkv.size(1) == B &&
                  wkv.size(2) == 3 && wkv.size(3) == C,
              "decode_blocks: the state does not match x [", B, ", ", C, "]");
  const auto dtype = x.scalar_type();
  auto att_next = torch::empty_like(att_shift), ffn_next = torch::empty_like(ffn_shift);
  auto wkv_next = torch::empty_like(wkv);
  std::vector<torch::Tensor> out_membranes(2 * L);
  const std::vector<int64_t> normalized{C};
  for (int64_t i = 0; i < L; ++i) {
    auto s = [&](int64_t product_index) { return static_cast<bool>(stream[i * kProducts + product_index]); };
    if (tensors[i * kSlots + kLn0Weight]) {
      x = at::layer_norm(x, normalized, get(tensors, i, kLn0Weight), get(tensors, i, kLn0Bias), eps);
    }
    // time mix
    const auto y = at::layer_norm(x, normalized, get(tensors, i, kLn1Weight), get(tensors, i, kLn1Bias), eps);
    const auto previous = att_shift[i].to(dtype);
    const auto delta = y - previous;
    const auto k = product(tensors, i, kAttKey, s(0), mix(previous, get(tensors, i, kAttMixK), delta));
    const auto v = product(tensors, i, kAttValue, s(1), mix(previous, get(tensors, i, kAttMixV), delta));
    const auto r = product(tensors, i, kAttReceptance, s(2), mix(previous, get(tensors, i, kAttMixR), delta));
    const auto w = -at::exp(get(tensors, i, kTimeDecay).to(torch::kFloat32)).contiguous();
    const auto u = get(tensors, i, kTimeFirst).to(torch::kFloat32).contiguous();
    auto as_seq = [&](const torch::Tensor& t) { return t.to(torch::kFloat32).view({B, 1, C}).contiguous(); };
    const auto wkv_out = wkv_forward_cpu(w, u, as_seq(k), as_seq(v), as_seq(r), wkv[i].contiguous(), 0);
    wkv_next[i].copy_(wkv_out[2]);
    const auto gated = wkv_out[3].view({B, C}).to(dtype);
    const auto mixed = product(tensors, i, kAttOutput, s(3), gated);
    x = x + fire(mixed, membrane_or_rest(membranes[2 * i], lif[i * kLifSettings + 2], B, C), out_membranes[2 * i],
                 &lif[i * kLifSettings]);
    att_next[i].copy_(y);
    // channel mix
    const auto z = at::layer_norm(x, normalized, get(tensors, i, kLn2Weight), get(tensors, i, kLn2Bias), eps);
    const auto previous2 = ffn_shift[i].to(dtype);
    const auto delta2 = z - previous2;
    const auto key = at::square(at::relu(
        product(tensors, i, kFfnKey, s(4), mix(previous2, get(tensors, i, kFfnMixK), delta2))));
    const auto gate = at::sigmoid(
        product(tensors, i, kFfnReceptance, s(5), mix(previous2, get(tensors, i, kFfnMixR), delta2)));
    const auto channel = gate * product(tensors, i, kFfnValue, s(6), key);
    x = x + fire(channel, membrane_or_rest(membranes[2 * i + 1], lif[i * kLifSettings + 5], B, C),
                 out_membranes[2 * i + 1], &lif[i * kLifSettings + 3]);
    ffn_next[i].copy_(z);
  }
  std::vector<torch::Tensor> out{x, att_next, ffn_next, wkv_next};
  out.insert(out.end(), out_membranes.begin(), out_membranes.end());
  return out;
}
