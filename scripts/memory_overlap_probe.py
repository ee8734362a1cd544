"""Does each core of this machine keep streaming memory while it computes? The measurement behind BENCHMARKS.md's
account of the 64-row products (CPU decoding, batch 64).

Usage: ``python scripts/memory_overlap_probe.py [--megabytes 384] [--fmas 64] [--repeats 5]`` (x86-64 with AVX2;
the compiler must know AMX's intrinsics: GCC 11 or clang 12 and later).

Every thread streams its share of a buffer larger than the caches, 1 KiB per step, and after each step does some
arithmetic that reads no memory of its own:

- ``fma``: ``--fmas`` float32 FMAs (AVX2) on eight registers, the stream read by plain vector loads;
- ``amx``: four TDPBF16PS on tiles loaded once (as many as a 64-row product does per KiB of bfloat16 weights),
  the stream read by plain vector loads;
- ``amx-tiles``: the same four TDPBF16PS on a B tile loaded from the stream itself (as the 64-row product
  reads its weights);
- ``amx product``: the project's own product (:class:`spikegpt_ft.ops.Linear`, bfloat16, 64 rows, on AMX) over
  768 x 768 weights filling the buffer's size, one after the other; its arithmetic alone is the same number of
  products by the first weight, which stays in the cache, and its stream the read of all the weights as
  ``spikegpt-ft bench`` reads them (:func:`spikegpt_ft.tools.bench.time_weight_read`). Beside it, the rate of
  those cached products and of ``spikegpt-ft bench``'s large bfloat16 product
  (:func:`spikegpt_ft.tools.bench.time_matmul_rate`).

Each is timed as the stream alone, the arithmetic alone (``amx-tiles``' tiles then from 16 KiB that stay in the
cache) and both, without and with a software prefetch 16 KiB ahead into the L2 cache (``_MM_HINT_T1``). Printed:
the median times and ``both / (stream + arithmetic)`` (near 1: the two add up) and ``both / max`` (near 1: they
overlap). The AMX kinds run where ``spikegpt_ft.ops.linear.amx_usable()`` (which also asks Linux for the tile
state).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.cpp_extension import load_inline

from spikegpt_ft.ops import Linear
from spikegpt_ft.ops.linear import amx_usable
from spikegpt_ft.system import cpu_flags, cpu_name
from spikegpt_ft.tools.bench import time_matmul_rate, time_weight_read

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <atomic>
#include <chrono>
#include <cstdint>

namespace {

constexpr int64_t kStepBytes = 1024, kPrefetchBytes = 16384, kCachedBytes = 16384;

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Steps [s0, s1) of the buffer at p (its first `window` bytes, over and over): plain loads of each step's bytes
// where `read`, then the arithmetic of `work` (0 none, 1 FMAs, 2 TDPBF16PS on fixed tiles, 3 the step's bytes as a
// B tile and TDPBF16PS on it).
__attribute__((target("avx2,fma,amx-tile,amx-bf16")))
uint64_t share(const char* p, int64_t s0, int64_t s1, int64_t window, bool read, int work, int64_t fmas,
               bool prefetch) {
  __m256i bits = _mm256_setzero_si256();
  __m256 f[8];
  for (int i = 0; i < 8; ++i) f[i] = _mm256_set1_ps(1.0f + 1e-3f * i);
  const __m256 scale = _mm256_set1_ps(0.9999f), shift = _mm256_set1_ps(1e-4f);
  alignas(64) uint16_t ones[2 * 512];
  alignas(64) float out[256];
  if (work >= 2) {
    TileConfig config;
    for (int t = 0; t < 8; ++t) {
      config.rows[t] = 16;
      config.colsb[t] = 64;
    }
    _tile_loadconfig(&config);
    for (auto& v : ones) v = 0x3f80;  // bfloat16 1.0
    _tile_loadd(4, ones, 64);
    _tile_loadd(5, ones + 512, 64);
    _tile_loadd(6, ones, 64);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t s = s0; s < s1; ++s) {
    const char* step = p + (s * kStepBytes) % window;
    if (prefetch) {
      for (int64_t b = 0; b < kStepBytes; b += 64) _mm_prefetch(step + kPrefetchBytes + b, _MM_HINT_T1);
    }
    if (read) {
      for (int64_t b = 0; b < kStepBytes; b += 32) {
        bits = _mm256_or_si256(bits, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(step + b)));
      }
    }
    if (work == 1) {
      for (int64_t j = 0; j < fmas; j += 8) {
        for (int i = 0; i < 8; ++i) f[i] = _mm256_fmadd_ps(f[i], scale, shift);
      }
    } else if (work >= 2) {
      if (work == 3) _tile_loadd(6, step, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 5, 6);
      _tile_dpbf16ps(2, 4, 6);
      _tile_dpbf16ps(3, 5, 6);
    }
  }
  float sum = 0;
  if (work >= 2) {
    _tile_stored(0, out, 64);
    sum = out[0];
    _tile_release();
  }
  alignas(32) float lanes[8];
  __m256 total = f[0];
  for (int i = 1; i < 8; ++i) total = _mm256_add_ps(total, f[i]);
  _mm256_store_ps(lanes, total);
  alignas(32) uint64_t words[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(words), bits);
  return words[0] ^ words[1] ^ words[2] ^ words[3] ^ static_cast<uint64_t>(lanes[0] + sum != 0);
}

// Where each pass leaves what it read, so that the compiler keeps the loads (an atomic others could read).
std::atomic<uint64_t> kept{0};

}  // namespace

// Seconds to run every step of `buffer` over the threads (each its contiguous share).
double timed(torch::Tensor buffer, bool cached, bool read, int64_t work, int64_t fmas, bool prefetch) {
  const char* p = static_cast<const char*>(buffer.data_ptr());
  const int64_t bytes = buffer.numel() - kPrefetchBytes, steps = bytes / kStepBytes;
  const int64_t window = cached ? kCachedBytes : bytes;
  const auto start = std::chrono::steady_clock::now();
  at::parallel_for(0, steps, 1024, [&](int64_t s0, int64_t s1) {
    kept ^= share(p, s0, s1, window, read, static_cast<int>(work), fmas, prefetch);
  });
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}
"""

KINDS = {"fma": 1, "amx": 2, "amx-tiles": 3}
#: The width of the amx product's square weights (the 216M model's).
WIDTH = 768


def median_ms(repeats: int, fn: Callable[..., float], *args: object) -> float:
    """Median milliseconds of ``repeats`` calls ``fn(*args)`` (which returns seconds), after one untimed call."""
    fn(*args)
    return 1e3 * statistics.median(fn(*args) for _ in range(repeats))


def time_products(count: int, repeats: int) -> tuple[float, float, float]:
    """Milliseconds to read ``count`` WIDTH x WIDTH bfloat16 weights, to multiply 64 rows by the first of them
    ``count`` times (it stays in the cache), and to multiply them by each in turn."""
    torch.manual_seed(0)
    layers = [Linear(WIDTH, WIDTH, bias=False, dtype=torch.bfloat16) for _ in range(count)]
    x = torch.randn(64, WIDTH, dtype=torch.bfloat16)

    def products(chosen: list[Linear]) -> float:
        start = time.perf_counter()
        for layer in chosen:
            layer(x)
        return time.perf_counter() - start

    read = time_weight_read(nn.ModuleList(layers), torch.device("cpu"), 1, repeats)
    with torch.inference_mode():
        return (
            read["weight_read_ms"],
            median_ms(repeats, products, [layers[0]] * len(layers)),
            median_ms(repeats, products, layers),
        )


def main(argv: list[str] | None = None) -> None:
    """Time the stream, the arithmetic and both for each kind, and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=384, help="the streamed buffer (more than the caches)")
    parser.add_argument("--fmas", type=int, default=64, help="FMAs per KiB of the stream for the fma kind")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="default: torch.get_num_threads()")
    args = parser.parse_args(argv)
    if not {"avx2", "fma"} <= cpu_flags():
        parser.error("the probe's arithmetic needs AVX2 and FMA, which this CPU does not report")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as build:
        probe = load_inline(
            "memory_overlap_probe",
            cpp_sources=SOURCE,
            functions=["timed"],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=build,
        )
    buffer = torch.randint(0, 256, (args.megabytes * 2**20,), dtype=torch.uint8)
    kinds = ["fma"] + (["amx", "amx-tiles"] if amx_usable() else [])
    load = os.getloadavg()[0]
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, {args.megabytes} MB, load average {load:.2f} at start")
    print("| kind | prefetch | stream ms | arithmetic ms | both ms | both / sum | both / max |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for kind in kinds:
        work = KINDS[kind]
        alone = median_ms(args.repeats, probe.timed, buffer, True, False, work, args.fmas, False)
        for prefetch in (False, True):
            # the stream again for each row, timed beside its "both": the machine's rate drifts between rows
            stream = median_ms(args.repeats, probe.timed, buffer, False, True, 0, 0, prefetch)
            plain_loads = kind != "amx-tiles"  # amx-tiles reads the stream through its tile loads alone
            both = median_ms(args.repeats, probe.timed, buffer, False, plain_loads, work, args.fmas, prefetch)
            print(
                f"| {kind} | {'16 KiB, T1' if prefetch else 'none'} | {stream:.2f} | {alone:.2f} | {both:.2f} | "
                f"{both / (stream + alone):.2f} | {both / max(stream, alone):.2f} |"
            )
    if amx_usable():
        count = args.megabytes * 2**20 // (WIDTH * WIDTH * 2)  # weights filling the buffer's size
        read, cached, streamed = time_products(count, args.repeats)
        print(
            f"| amx product | none (the kernel's) | {read:.2f} | {cached:.2f} | {streamed:.2f} | "
            f"{streamed / (read + cached):.2f} | {streamed / max(read, cached):.2f} |"
        )
        flops = 2 * 64 * WIDTH * WIDTH * count
        cached_rate, large_rate = flops / cached / 1e6, time_matmul_rate(torch.bfloat16, torch.device("cpu"), 3, 20)
        print(
            f"\nThe cached products: {cached_rate:.0f} GFLOP/s; the large bfloat16 product: {large_rate:.0f} GFLOP/s "
            f"({cached_rate / large_rate:.2f} x); the streamed products: {flops / streamed / 1e6:.0f} GFLOP/s "
            f"({flops / streamed / 1e6 / large_rate:.2f} x)."
        )


if __name__ == "__main__":
    main()
