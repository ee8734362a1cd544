// Software prefetches for loops that read memory as one sequential stream: how far ahead of the bytes they read,
// and into which cache, they ask for the next ones. Which is fastest depends on the machine, and a prefetch changes
// no value, so the streaming products measure the candidates in each process (linear_cpu.cpp, `calibrate_prefetch`)
// and the benchmark's read of memory takes the fastest of them and none (memory_cpu.cpp, `bench.time_weight_read`).
// The candidates:
// - 2 KiB ahead into the L1 cache: on the AMD EPYC of linear_cpu.cpp's comment 1 KiB and 2 - 8 KiB ran alike;
// - 16 KiB ahead into the L2 cache: on the Intel Xeon (AVX-512, AMX) of BENCHMARKS.md the 216M model's products
//   of one row in model order took 1.12 - 1.15 x the time of reading the weights in bf16 (1.35 - 1.36 x with the
//   first), 1.43 x in int8 (1.66 - 1.80 x), in alternating scratch runs; 2 - 8 KiB into the L2 and longer
//   distances into the L1 were slower. A prefetch into the L1 takes one of the core's few buffers for
//   outstanding misses until the line arrives; one into the L2 does not.
#pragma once

#include <cstdint>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace software_prefetch {

struct Prefetch {
  const char* name;
  bool into_l2;
  int64_t ahead;  // bytes
};
constexpr Prefetch kPrefetches[] = {{"l1-2k", false, 2048}, {"l2-16k", true, 16 * 1024}};
constexpr int kCount = sizeof(kPrefetches) / sizeof(kPrefetches[0]);

// Ask for the cache line `p.ahead` bytes after `at` (nothing where the compiler has no x86 prefetch).
inline void ahead(const Prefetch& p, const void* at) {
#if defined(__x86_64__) && defined(__GNUC__)
  const char* line = static_cast<const char*>(at) + p.ahead;
  if (p.into_l2) {
    _mm_prefetch(line, _MM_HINT_T1);
  } else {
    _mm_prefetch(line, _MM_HINT_T0);
  }
#endif
}

// The index in kPrefetches of the prefetch called `name`, or -1.
inline int find(const std::string& name) {
  for (int c = 0; c < kCount; ++c) {
    if (name == kPrefetches[c].name) return c;
  }
  return -1;
}

// The names of kPrefetches, comma-separated, after `first` (for messages).
inline std::string names(std::string first) {
  for (const auto& p : kPrefetches) first += std::string(", ") + p.name;
  return first;
}

}  // namespace software_prefetch
