// The WKV CUDA kernels (cuda_ext/wkv_cuda_kernels.cuh) compiled for the CPU, for the tests where no GPU is.
//
// Each block runs as one CPU thread per CUDA thread: __syncthreads is a barrier across them, a __shared__
// array is one array they all see, and the blocks run one after another with the launch geometry the GPU
// launchers use. So the kernels' own source (indexing, chunking, the summaries in shared memory, the
// barrier) is run and checked. Not modelled: warps, float16/bfloat16 reads (float32 inputs only), and
// memory ordering beyond what the barrier gives.
#include <torch/extension.h>

#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x = 1, unsigned y = 1, unsigned z = 1) : x(x), y(y), z(z) {}
};

namespace {

// A barrier for the threads of one block. A thread left waiting for seconds means that another thread of
// its block never reached __syncthreads (on a GPU, a hang or undefined behaviour): an error here.
class BlockBarrier {
 public:
  explicit BlockBarrier(unsigned threads) : threads_(threads) {}

  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    if (++arrived_ == threads_) {
      arrived_ = 0;
      ++generation_;
      released_.notify_all();
      return;
    }
    const unsigned generation = generation_;
    const bool passed = released_.wait_for(lock, std::chrono::seconds(20),
                                           [&] { return generation_ != generation || broken_; });
    if (!passed || broken_) {
      broken_ = true;
      released_.notify_all();
      throw std::runtime_error("a thread waited at __syncthreads for a thread of its block that never came");
    }
  }

  void abandon() {
    std::lock_guard<std::mutex> lock(mutex_);
    broken_ = true;
    released_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable released_;
  const unsigned threads_;
  unsigned arrived_ = 0, generation_ = 0;
  bool broken_ = false;
};

}  // namespace

// What the kernels see of CUDA.
thread_local dim3 threadIdx;
dim3 blockIdx, blockDim;
BlockBarrier* block_barrier = nullptr;
inline void __syncthreads() { block_barrier->wait(); }
using std::min;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(threads)

#include "wkv_cuda_kernels.cuh"

namespace {

// Runs kernel(args...) over the launch's grid, block after block, each block's threads as CPU threads.
template <typename... Params, typename... Args>
void launch(const wkv_cuda::Launch& at, void (*kernel)(Params...), Args... args) {
  for (unsigned by = 0; by < at.grid.y; ++by) {
    for (unsigned bx = 0; bx < at.grid.x; ++bx) {
      blockIdx = dim3(bx, by);
      blockDim = at.block;
      BlockBarrier barrier(at.block.x * at.block.y);
      block_barrier = &barrier;
      std::exception_ptr error;
      std::mutex error_mutex;
      std::vector<std::thread> threads;
      for (unsigned ty = 0; ty < at.block.y; ++ty) {
        for (unsigned tx = 0; tx < at.block.x; ++tx) {
          threads.emplace_back([&, tx, ty] {
            threadIdx = dim3(tx, ty);
            try {
              kernel(args...);
            } catch (...) {
              std::lock_guard<std::mutex> lock(error_mutex);
              if (!error) error = std::current_exception();
              barrier.abandon();
            }
          });
        }
      }
      for (auto& t : threads) t.join();
      if (error) std::rethrow_exception(error);
    }
  }
}

void check(const std::vector<const torch::Tensor*>& tensors) {
  for (const auto* x : tensors) {
    TORCH_CHECK(x->device().is_cpu() && x->scalar_type() == torch::kFloat32 && x->is_contiguous(),
                "wkv_cuda_on_cpu: contiguous float32 CPU tensors only");
  }
}

const float* data_or_null(const std::optional<torch::Tensor>& x) { return x ? x->data_ptr<float>() : nullptr; }

}  // namespace

// The chunk length and launch geometry the GPU launchers use: (len, grid.x, grid.y, block.x, block.y).
std::vector<int64_t> geometry(int64_t B, int64_t T, int64_t C, int64_t requested) {
  const int64_t len = wkv_cuda::chunk_len_for(B, T, C, requested);
  const auto at = wkv_cuda::launch_for(B, T, C, len);
  return {len, at.grid.x, at.grid.y, at.block.x, at.block.y};
}

// wkv_forward of ops.cpp for float32: (y, log_den, state_out, out).
std::vector<torch::Tensor> forward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                   std::optional<torch::Tensor> r, torch::Tensor state, int64_t requested) {
  check({&w, &u, &k, &v, &state});
  if (r) check({&*r});
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  const int64_t len = wkv_cuda::chunk_len_for(B, T, C, requested);
  auto y = torch::empty_like(k), log_den = torch::empty_like(k), state_out = torch::empty_like(state);
  auto out = r ? torch::empty_like(k) : y;
  launch(wkv_cuda::launch_for(B, T, C, len), &wkv_cuda::forward_kernel<float>, T, C, len, w.data_ptr<float>(),
         u.data_ptr<float>(), static_cast<const float*>(k.data_ptr<float>()),
         static_cast<const float*>(v.data_ptr<float>()), data_or_null(r),
         static_cast<const float*>(state.data_ptr<float>()), y.data_ptr<float>(), log_den.data_ptr<float>(),
         r ? out.data_ptr<float>() : static_cast<float*>(nullptr), state_out.data_ptr<float>());
  return {y, log_den, state_out, out};
}

// wkv_backward of ops.cpp for float32: (gw [B * chunks, C], gu, gk, gv, gr).
std::vector<torch::Tensor> backward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                    std::optional<torch::Tensor> r, torch::Tensor y, torch::Tensor log_den,
                                    torch::Tensor gout, torch::Tensor state, int64_t requested) {
  check({&w, &u, &k, &v, &y, &log_den, &gout, &state});
  if (r) check({&*r});
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  const int64_t len = wkv_cuda::chunk_len_for(B, T, C, requested);
  auto gk = torch::empty_like(k), gv = torch::empty_like(k), gr = torch::empty({r ? B : 0, T, C}, k.options());
  auto gw = torch::empty({B * wkv::chunk_count(T, len), C}, k.options()), gu = torch::empty_like(gw);
  launch(wkv_cuda::launch_for(B, T, C, len), &wkv_cuda::backward_kernel<float>, T, C, len, w.data_ptr<float>(),
         u.data_ptr<float>(), static_cast<const float*>(k.data_ptr<float>()),
         static_cast<const float*>(v.data_ptr<float>()), data_or_null(r),
         static_cast<const float*>(y.data_ptr<float>()), static_cast<const float*>(log_den.data_ptr<float>()),
         static_cast<const float*>(gout.data_ptr<float>()), static_cast<const float*>(state.data_ptr<float>()),
         gw.data_ptr<float>(), gu.data_ptr<float>(), gk.data_ptr<float>(), gv.data_ptr<float>(),
         r ? gr.data_ptr<float>() : static_cast<float*>(nullptr));
  return {gw, gu, gk, gv, gr};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("geometry", &geometry, "(B, T, C, requested chunk_len) -> (len, grid.x, grid.y, block.x, block.y)");
  m.def("forward", &forward, "the CUDA forward kernel run on the CPU: (w, u, k, v, r or None, state, chunk_len)");
  m.def("backward", &backward,
        "the CUDA backward kernel run on the CPU: (w, u, k, v, r or None, y, log_den, gout, state, chunk_len)");
}
