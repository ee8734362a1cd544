// Python bindings of the compiled kernels. The WKV operator's `wkv_forward` and `wkv_backward`
// dispatch on the device of their inputs to the CPU kernels (wkv_cpu.cpp) or, when built WITH_CUDA, the GPU kernels.
// The caller passes the CUDA stream (torch.cuda.current_stream().cuda_stream) and makes the
// inputs' GPU current, so this file needs no CUDA headers and compiles against any torch build.
#include <torch/extension.h>

#include <optional>
#include <string>

#include "cpu_clones.h"

#ifdef WITH_CUDA
#include "wkv_core.h"
#include "wkv_cuda.h"
#endif

std::vector<torch::Tensor> wkv_forward_cpu(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                           std::optional<torch::Tensor> r, torch::Tensor state, int64_t chunk_len);
std::vector<torch::Tensor> wkv_backward_cpu(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                            std::optional<torch::Tensor> r, torch::Tensor y, torch::Tensor log_den,
                                            torch::Tensor gout, torch::Tensor state, int64_t chunk_len);
// The LIF neuron's CPU kernels (lif_cpu.cpp); on a GPU SpikingJelly's own kernels run instead.
std::vector<torch::Tensor> lif_forward_cpu(torch::Tensor x, torch::Tensor v0, double tau, double v_threshold,
                                           double v_reset);
std::vector<torch::Tensor> lif_backward_cpu(torch::Tensor grad_spikes, torch::Tensor grad_v_last, torch::Tensor h,
                                            double tau, double v_threshold, double v_reset, double alpha);
// The decoding products with bfloat16 or int8 weights (linear_cpu.cpp).
std::vector<std::string> linear_kernels_cpu();
torch::Tensor stream_linear_cpu(torch::Tensor x, torch::Tensor weight, std::optional<torch::Tensor> scale,
                                std::optional<torch::Tensor> bias, const std::string& kernel);
std::string stream_prefetch_cpu();
void set_stream_prefetch_cpu(const std::string& name);
// The products of many rows with bfloat16 weights on AMX (amx_linear.cpp).
bool amx_usable_cpu();
namespace int8_digits {
bool amx_usable();  // int8 weights by many bfloat16 rows on AMX-INT8 (amx_linear.cpp, int8_digits.h)
}
torch::Tensor amx_pack_weight_cpu(torch::Tensor weight);
torch::Tensor amx_linear_cpu(torch::Tensor x, torch::Tensor packed, int64_t N, std::optional<torch::Tensor> bias);
// A pass that only reads memory, the limit of CPU decoding (memory_cpu.cpp).
int64_t read_bytes_cpu(std::vector<torch::Tensor> tensors, const std::string& prefetch);
// "none" and prefetch.h's prefetches by name: the ways read_bytes can read.
std::vector<std::string> read_prefetches_cpu();
// One recurrent step through a stack of blocks (decode_cpu.cpp).
std::vector<torch::Tensor> decode_blocks_cpu(torch::Tensor x, std::vector<std::optional<torch::Tensor>> tensors,
                                             std::vector<int64_t> kernels, std::vector<int64_t> lora_kernels,
                                             std::vector<int64_t> gates,
                                             std::vector<double> scalars, torch::Tensor att_shift,
                                             torch::Tensor ffn_shift, torch::Tensor wkv,
                                             std::vector<std::optional<torch::Tensor>> membranes,
                                             std::vector<double> lif, double eps, bool record,
                                             std::vector<torch::Tensor> into);

#ifndef WITH_CUDA
constexpr const char* kNoCudaKernels =
    "wkv: this build of the extension has no CUDA kernels: no CUDA toolkit (nvcc) was found when it was built; "
    "install one or set CUDA_HOME to it, and a new Python process builds the CUDA kernels at first use";
#endif

#ifdef WITH_CUDA
namespace {

WkvInput input_kind(const torch::Tensor& k) {
  switch (k.scalar_type()) {
    case torch::kFloat32: return WkvInput::kFloat32;
    case torch::kFloat16: return WkvInput::kFloat16;
    case torch::kBFloat16: return WkvInput::kBFloat16;
    default: TORCH_CHECK(false, "wkv (cuda): k and v must be float32, float16 or bfloat16");
  }
}

void check_cuda(const torch::Tensor& w, const torch::Tensor& u, const torch::Tensor& k,
                const torch::Tensor& v, const std::optional<torch::Tensor>& r, const torch::Tensor& state) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && v.scalar_type() == k.scalar_type(),
              "wkv: k and v must both be [B, T, C] of one dtype");
  TORCH_CHECK(!r || (r->sizes() == k.sizes() && r->scalar_type() == k.scalar_type()),
              "wkv: the receptance r must be [B, T, C] of k's dtype");
  const auto C = k.size(2);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == C && u.sizes() == w.sizes(), "wkv: w and u must be [C]");
  TORCH_CHECK(state.dim() == 3 && state.size(0) == k.size(0) && state.size(1) == 3 &&
                  state.size(2) == C,
              "wkv: state must be [B, 3, C]");
  for (const auto* x : {&w, &u, &state}) {
    TORCH_CHECK(x->scalar_type() == torch::kFloat32, "wkv (cuda): w, u and state must be float32");
  }
  for (const auto* x : {&w, &u, &k, &v, &state, r ? &*r : &k}) {
    TORCH_CHECK(x->is_cuda() && x->is_contiguous() && x->device() == k.device(),
                "wkv (cuda): all inputs must be contiguous tensors on one GPU");
  }
  TORCH_CHECK(k.size(1) > 0, "wkv: the sequence must hold at least one token");
  TORCH_CHECK(k.size(0) <= 65535, "wkv (cuda): at most 65535 sequences per call");
}

}  // namespace
#endif

// chunk_len: tokens per chunk run in parallel (0: the device's default; see wkv_core.h). r: the optional
// receptance; with it `out` is the gated output sigmoid(r) y (else `out` is y). Returns (y, log_den, state_out, out).
std::vector<torch::Tensor> wkv_forward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                       std::optional<torch::Tensor> r, torch::Tensor state, int64_t chunk_len,
                                       int64_t stream) {
  if (k.device().is_cpu()) return wkv_forward_cpu(w, u, k, v, r, state, chunk_len);
#ifdef WITH_CUDA
  check_cuda(w, u, k, v, r, state);
  const auto f32 = k.options().dtype(torch::kFloat32);
  auto y = torch::empty(k.sizes(), f32), log_den = torch::empty(k.sizes(), f32);
  auto out = r ? torch::empty(k.sizes(), f32) : y;
  auto state_out = torch::empty_like(state);
  const int64_t len = wkv_cuda_chunk_len(k.size(0), k.size(1), k.size(2), chunk_len);
  const char* error = wkv_forward_cuda(
      input_kind(k), k.size(0), k.size(1), k.size(2), len, w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr(),
      v.data_ptr(), r ? r->data_ptr() : nullptr, state.data_ptr<float>(), y.data_ptr<float>(),
      log_den.data_ptr<float>(), r ? out.data_ptr<float>() : nullptr, state_out.data_ptr<float>(),
      reinterpret_cast<void*>(stream));
  TORCH_CHECK(error == nullptr, "wkv (cuda): the forward kernel failed to launch: ", error);
  return {y, log_den, state_out, out};
#else
  TORCH_CHECK(false, kNoCudaKernels);
#endif
}

// gout: the gradient of forward's `out`. Returns (gw [B*chunks, C], gu [B*chunks, C], gk, gv, gr); gr is
// empty without r.
std::vector<torch::Tensor> wkv_backward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                        std::optional<torch::Tensor> r, torch::Tensor y, torch::Tensor log_den,
                                        torch::Tensor gout, torch::Tensor state, int64_t chunk_len,
                                        int64_t stream) {
  TORCH_CHECK(y.sizes() == k.sizes() && log_den.sizes() == k.sizes() && gout.sizes() == k.sizes(),
              "wkv backward: y, log_den and gout must match k");
  if (k.device().is_cpu()) return wkv_backward_cpu(w, u, k, v, r, y, log_den, gout, state, chunk_len);
#ifdef WITH_CUDA
  check_cuda(w, u, k, v, r, state);
  for (const auto* x : {&y, &log_den}) {
    TORCH_CHECK(x->scalar_type() == torch::kFloat32 && x->is_contiguous() && x->device() == k.device(),
                "wkv backward (cuda): y and log_den must be contiguous float32 tensors on k's GPU");
  }
  TORCH_CHECK(gout.device() == k.device(), "wkv backward (cuda): gout must be on k's GPU");
  gout = gout.to(torch::kFloat32).contiguous();
  const auto f32 = k.options().dtype(torch::kFloat32);
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  const int64_t len = wkv_cuda_chunk_len(B, T, C, chunk_len);
  auto gk = torch::empty(k.sizes(), f32), gv = torch::empty(k.sizes(), f32);
  auto gr = torch::empty({r ? B : 0, T, C}, f32);
  auto gw = torch::empty({B * wkv::chunk_count(T, len), C}, f32), gu = torch::empty_like(gw);
  const char* error = wkv_backward_cuda(
      input_kind(k), B, T, C, len, w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr(), v.data_ptr(),
      r ? r->data_ptr() : nullptr, y.data_ptr<float>(), log_den.data_ptr<float>(), gout.data_ptr<float>(),
      state.data_ptr<float>(), gw.data_ptr<float>(), gu.data_ptr<float>(), gk.data_ptr<float>(), gv.data_ptr<float>(),
      r ? gr.data_ptr<float>() : nullptr, reinterpret_cast<void*>(stream));
  TORCH_CHECK(error == nullptr, "wkv (cuda): the backward kernel failed to launch: ", error);
  return {gw, gu, gk, gv, gr};
#else
  TORCH_CHECK(false, kNoCudaKernels);
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("wkv_forward", &wkv_forward,
        "WKV forward: (w, u, k, v, r or None, state, chunk_len, cuda_stream) -> (y, log_den, state_out, out)");
  m.def("wkv_backward", &wkv_backward,
        "WKV backward: (w, u, k, v, r or None, y, log_den, gout, state, chunk_len, cuda_stream) -> "
        "(gw[B*chunks,C], gu[B*chunks,C], gk, gv, gr)");
  m.def("cpu_loops", [] { return std::string(CPU_LOOPS); },
        "the targets this build compiled its CPU loops for (cpu_clones.h): 'x86-64-v4, avx2, baseline' (the loader "
        "picks one per CPU), or the one that SPIKEGPT_FT_CPU_LOOPS asked for");
  m.def("linear_kernels", &linear_kernels_cpu, "the streaming product kernels this CPU runs, best first");
  m.def("stream_linear", &stream_linear_cpu,
        "linear, streaming the weights (cpu): (x[M,K], weight[N,K] bf16 or int8, scale[N] (int8) or None, "
        "bias[N] or None, kernel 'auto'|'avx512-bf16'|'avx512-vnni'|'avx512'|'avx2'|'portable') -> "
        "y[M,N] in x's dtype");
  m.def("stream_prefetch", &stream_prefetch_cpu,
        "how stream_linear prefetches weights from memory on this machine, measured at the first call: "
        "'l1-2k', 'l2-16k', or 'none' (no vector kernel)");
  m.def("set_stream_prefetch", &set_stream_prefetch_cpu,
        "use one of stream_prefetch's prefetches from now on, or the measured one again ('auto')");
  m.def("amx_usable", &amx_usable_cpu, "whether this CPU, build and OS run the AMX product");
  m.def("amx_int8_usable", &int8_digits::amx_usable,
        "whether this CPU, build and OS run stream_linear's int8 products of more than four bf16 rows on AMX-INT8");
  m.def("amx_pack_weight", &amx_pack_weight_cpu,
        "a bf16 weight[N,K] laid out for amx_linear: [ceil(N/32), ceil(K/32), 2, 16, 16, 2], zero-padded");
  m.def("amx_linear", &amx_linear_cpu,
        "linear on AMX tiles (cpu): (x[M,K] bf16, amx_pack_weight(weight), N, bias[N] or None) -> y[M,N] bf16");
  m.def("read_bytes", &read_bytes_cpu,
        "the bitwise OR of every byte of the tensors (contiguous, cpu), each byte read once by the threads, with "
        "one of read_prefetches' software prefetches: a pass over memory that does nothing else",
        py::arg("tensors"), py::arg("prefetch") = "none");
  m.def("read_prefetches", &read_prefetches_cpu, "the software prefetches read_bytes takes: 'none' and the rest");
  m.def("decode_blocks", &decode_blocks_cpu,
        "one token through a stack of SpikeGPT blocks (cpu): (x[B,C], tensors, product kernels, adapter kernels, "
        "gates, product scalars, "
        "att_shift[L,B,C], ffn_shift[L,B,C], wkv[L,B,3,C], membranes, lif settings, eps, record, into: [] or the "
        "3 tensors for the next att_shift, ffn_shift, wkv) -> "
        "(x, att_shift, ffn_shift, wkv, *membranes, *gated)");
  m.def("lif_forward", &lif_forward_cpu,
        "LIF forward (cpu): (x[T,*S], v0[S], tau, v_threshold, v_reset) -> (spikes[T,*S], v_last[S], h[T,*S])");
  m.def("lif_backward", &lif_backward_cpu,
        "LIF backward (cpu): (grad_spikes[T,*S], grad_v_last[S], h[T,*S], tau, v_threshold, v_reset, alpha) -> "
        "(grad_x[T,*S], grad_v0[S])");
}
