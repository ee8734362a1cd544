// CPU_CLONES: compile a hot loop three times, for AVX-512, AVX2 and the baseline x86-64 (SSE2), and let the
// loader pick the best for the CPU at hand (GCC's function multiversioning). The extension itself is built
// for the baseline, so that one build runs on any x86-64 machine; the wider vectors make the kernels'
// loops about 2x faster where the CPU has them. Elsewhere (other compilers, other architectures) the
// functions are compiled once, for the build's target.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CPU_CLONES
#endif
