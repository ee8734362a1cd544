// Reading memory once, as fast as the machine reads it: the limit that CPU decoding is measured against.
//
// Why hand-written: decoding one token reads every weight once, so the benchmark reports each step beside the
// time to read those weights (`spikegpt-ft bench recurrent`, BENCHMARKS.md). ATen has no pure read; its
// reductions stand in for one at very different speeds. On the Intel Xeon of BENCHMARKS.md a 64-bit-word `max`
// read the 216M model's 353 MB of bfloat16 weights in 26.4 - 26.6 ms where this loop reads them in 17.1 - 17.2
// ms (and a float32 `sum` of the same bytes took 21.2 ms, a bfloat16 `sum` 30.9 ms): a reference that slow makes
// every product look close to the memory's speed.
//
// `read_bytes` ORs every byte of its tensors together, so that no read can be left out. The bytes of all the
// tensors are cut into equal shares, one per thread, each read as one sequential stream of 64-bit words by a
// loop of 8 independent ORs that the compiler vectorises (cpu_clones.h: 512-bit loads where the CPU has
// AVX-512), with one of prefetch.h's software prefetches ahead of it or none. Which reads fastest depends on the
// machine, so the benchmark times each and keeps the fastest (`bench.time_weight_read`): a reference slower than
// the machine's read would make every product look closer to it. On the Intel Xeon of BENCHMARKS.md, reading the
// 216M model's 353 MB of bfloat16 weights on two threads took 10.83 - 11.11 ms with the prefetch 16 KiB ahead into
// the L2 cache, 11.55 - 12.33 ms with none and 12.07 - 12.38 ms 2 KiB ahead into the L1 (four rounds of medians of
// seven, at 58bf042 with this change); on one thread 23.55 - 23.78, 25.06 - 25.49 and 25.29 - 25.73 ms.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_clones.h"
#include "prefetch.h"

namespace {

// Bytes below which a second thread costs more than it saves.
constexpr int64_t kMinBytesPerThread = 1 << 20;

// The OR of `n` bytes from p, as 64-bit words where whole (folded into one byte at the end by the caller), with
// the prefetch `ahead` of every 64 bytes, or none where null.
CPU_CLONES uint64_t or_bytes(const unsigned char* p, int64_t n, const software_prefetch::Prefetch* ahead) {
  constexpr int kLanes = 8;
  uint64_t lanes[kLanes] = {};
  const int64_t words = n / 8;
  int64_t i = 0;
  for (; i + kLanes <= words; i += kLanes) {
    if (ahead != nullptr) software_prefetch::ahead(*ahead, p + i * 8);
    uint64_t w[kLanes];
    std::memcpy(w, p + i * 8, sizeof w);  // unaligned 64-bit loads, as the compiler's vector loads
    for (int j = 0; j < kLanes; ++j) lanes[j] |= w[j];
  }
  uint64_t out = 0;
  for (int j = 0; j < kLanes; ++j) out |= lanes[j];
  for (int64_t b = i * 8; b < n; ++b) out |= p[b];
  return out;
}

uint8_t fold(uint64_t word) {
  uint8_t out = 0;
  for (int b = 0; b < 8; ++b) out |= static_cast<uint8_t>(word >> (8 * b));
  return out;
}

}  // namespace

// The bitwise OR of every byte of `tensors` (each a contiguous CPU tensor), all read once by the threads, with the
// software prefetch called `prefetch` (prefetch.h) or "none".
int64_t read_bytes_cpu(std::vector<torch::Tensor> tensors, const std::string& prefetch) {
  const int chosen = software_prefetch::find(prefetch);
  TORCH_CHECK(chosen >= 0 || prefetch == "none", "read_bytes: unknown prefetch '", prefetch, "' (",
              software_prefetch::names("none"), ")");
  const software_prefetch::Prefetch* ahead = chosen >= 0 ? &software_prefetch::kPrefetches[chosen] : nullptr;
  std::vector<const unsigned char*> starts;
  std::vector<int64_t> ends{0};  // where each tensor's bytes end, counted over all of them
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "read_bytes: every tensor must be a contiguous CPU tensor");
    starts.push_back(static_cast<const unsigned char*>(t.data_ptr()));
    ends.push_back(ends.back() + t.numel() * t.element_size());
  }
  std::atomic<uint64_t> total{0};
  at::parallel_for(0, ends.back(), kMinBytesPerThread, [&](int64_t begin, int64_t end) {
    uint64_t found = 0;
    // the tensors overlapping [begin, end), each from its first byte in the range to its last
    auto i = std::upper_bound(ends.begin(), ends.end(), begin) - ends.begin() - 1;
    for (; i < static_cast<int64_t>(starts.size()) && ends[i] < end; ++i) {
      const int64_t from = std::max(begin, ends[i]), to = std::min(end, ends[i + 1]);
      if (to > from) found |= or_bytes(starts[i] + (from - ends[i]), to - from, ahead);
    }
    total.fetch_or(found);
  });
  return fold(total.load());
}

std::vector<std::string> read_prefetches_cpu() {
  std::vector<std::string> out{"none"};
  for (const auto& p : software_prefetch::kPrefetches) out.emplace_back(p.name);
  return out;
}
