// CPU_CLONES: compile a hot loop three times, for AVX-512, AVX2 and the baseline x86-64 (SSE2), and let the
// loader pick the best for the CPU at hand (GCC's function multiversioning). The extension itself is built
// for the baseline, so that one build runs on any x86-64 machine; the wider vectors make the kernels'
// loops about 2x faster where the CPU has them. Elsewhere (other compilers, other architectures) the
// functions are compiled once, for the build's target.
//
// The AVX-512 clone is built for x86-64-v4 (AVX-512 F, BW, CD, DQ and VL, which every AVX-512 CPU but Xeon Phi
// has), not for AVX-512F alone: without BW and VL, GCC 12 compiled the bfloat16 loops with AVX2's 256-bit
// instructions and vector masks, and the 16-bit conversions in many steps. On the Intel Xeon of BENCHMARKS.md, a
// standalone copy of square(relu(k)) over 64 x 3072 bfloat16 values took 30.9 us so against 65.1 us on one thread
// (the fastest of 2000 calls, the same bits), and the bf16 step of the 216M model at 64 rows median 34.7 ms against
// 36.1 ms (33.9 - 36.7 against 35.2 - 36.6; eight alternating pairs of processes, faster in seven), with no
// difference at batch 1 nor for int8 weights at 64 rows.
// GCC before 11 does not know x86-64-v4 and builds the AVX-512F clone.
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
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#define CPU_LOOPS "x86-64-v4, avx2, baseline"
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define CPU_LOOPS "avx512f, avx2, baseline"
#else
#define CPU_CLONES
#define CPU_LOOPS "build target"
#endif
