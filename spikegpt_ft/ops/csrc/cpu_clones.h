// CPU_CLONES: compile a hot loop three times, for AVX-512, AVX2 and the baseline x86-64 (SSE2), and let the
// loader pick the best for the CPU at hand (GCC's function multiversioning). The extension itself is built
// for the baseline, so that one build runs on any x86-64 machine; the wider vectors make the kernels'
// loops about 2x faster where the CPU has them. Elsewhere (other compilers, other architectures) the
// functions are compiled once, for the build's target.
//
// A build with SPIKEGPT_FT_CPU_LOOPS_AVX2 or SPIKEGPT_FT_CPU_LOOPS_BASELINE defined (extension.py defines one
// where the environment variable SPIKEGPT_FT_CPU_LOOPS asks for it) compiles the loops for that one target
// instead: a machine with AVX-512 then runs the loops that machines without it run, so that the tests can check
// them there (tests/test_cpu_loops.py). CPU_LOOPS names the loops a build holds (the binding `cpu_loops`).
#pragma once

#if defined(SPIKEGPT_FT_CPU_LOOPS_AVX2)
#define CPU_CLONES __attribute__((target("avx2")))
#define CPU_LOOPS "avx2"
#elif defined(SPIKEGPT_FT_CPU_LOOPS_BASELINE)
#define CPU_CLONES
#define CPU_LOOPS "baseline"
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define CPU_LOOPS "avx512f, avx2, baseline"
#else
#define CPU_CLONES
#define CPU_LOOPS "build target"
#endif
