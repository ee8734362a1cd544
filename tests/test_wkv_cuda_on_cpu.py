"""The CUDA WKV kernels' own source, run on the CPU (tests/cuda_emulation/), against the CPU kernels.

Where no GPU is, this is what checks the GPU kernels' indexing, chunking and barrier: the kernels of
``spikegpt_ft/ops/csrc/wkv_cuda_kernels.cuh`` are compiled for the CPU with each block's threads as CPU
threads, launched with the geometry the GPU launchers use, and compared with the CPU kernels' single sweep in float64.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import load

from spikegpt_ft.ops.extension import KERNEL_DIR, extension
from spikegpt_ft.ops.wkv import fresh_state

#: float32 against the float64 reference, relative to the largest value: the kernels and the reference add
#: the same terms in a different order, over at most a few hundred tokens.
RTOL = 2e-5


@pytest.fixture(scope="module")
def gpu_kernels_on_cpu():
    source = Path(__file__).parent / "cuda_emulation" / "wkv_cuda_on_cpu.cpp"
    return load(name="wkv_cuda_on_cpu", sources=[str(source)], extra_include_paths=[str(KERNEL_DIR)],
                extra_cflags=["-O1"], verbose=False)  # fmt: skip


def inputs(B: int, T: int, C: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """float64 inputs: decays and bonuses as in trained models, a carried state, a receptance, a gradient."""
    g = torch.Generator().manual_seed(seed)
    k, v, r, gout = (torch.randn(B, T, C, generator=g, dtype=torch.float64) for _ in range(4))
    w = -torch.exp(torch.rand(C, generator=g, dtype=torch.float64) * 4 - 3)
    u = torch.rand(C, generator=g, dtype=torch.float64) * 2 - 1
    warm = torch.randn(B, 5, C, generator=g, dtype=torch.float64)
    state = extension().wkv_forward(w, u, warm, warm.flip(1), None, fresh_state(B, C).double(), 0, 0)[2]
    return {"w": w, "u": u, "k": k, "v": v, "r": r * 3, "gout": gout, "state": state}


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = want.abs().max().clamp(min=1e-30)
    assert ((got.double() - want).abs().max() / scale).item() <= RTOL


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("requested", [0, 1, 3, 7, 1000])
@pytest.mark.parametrize("shape", [(2, 17, 40), (1, 300, 8), (3, 64, 200), (2, 1, 130)])
def test_cuda_kernels_on_cpu_match_the_cpu_kernels(gpu_kernels_on_cpu, shape, requested, gated):
    """Forward (outputs, log-denominators, final state) and backward (every gradient) with the chunk lengths
    the GPU would use: its own choice (0), one token per chunk, a length that leaves a short last chunk,
    one that is raised to fit 32 chunks, and one chunk of the whole sequence."""
    B, T, C = shape
    x = inputs(B, T, C)
    r = x["r"] if gated else None
    cpu = extension()  # the CPU kernels, one sweep (chunk_len 0), on the CPU stream 0
    ref = cpu.wkv_forward(x["w"], x["u"], x["k"], x["v"], r, x["state"], 0, 0)
    ref_grads = cpu.wkv_backward(x["w"], x["u"], x["k"], x["v"], r, ref[0], ref[1], x["gout"], x["state"], 0, 0)

    f = {name: t.float().contiguous() for name, t in x.items()}
    r32 = f["r"] if gated else None
    got = gpu_kernels_on_cpu.forward(f["w"], f["u"], f["k"], f["v"], r32, f["state"], requested)
    for g, want in zip(got, ref, strict=True):  # y, log_den, state_out, out
        assert_close(g, want)
    grads = gpu_kernels_on_cpu.backward(f["w"], f["u"], f["k"], f["v"], r32, got[0], got[1], f["gout"], f["state"],
                                        requested)  # fmt: skip
    gw, gu, gk, gv, gr = grads
    assert_close(gw.sum(0), ref_grads[0].sum(0))  # one row per (sequence, chunk)
    assert_close(gu.sum(0), ref_grads[1].sum(0))
    assert_close(gk, ref_grads[2])
    assert_close(gv, ref_grads[3])
    if gated:
        assert_close(gr, ref_grads[4])
    else:
        assert gr.numel() == 0


def test_launch_geometry_covers_every_token_and_channel_within_cuda_limits(gpu_kernels_on_cpu):
    """The chunk length and launch shape the GPU launchers compute, over batch sizes, lengths, widths and
    requested chunk lengths: every token in exactly one chunk, every channel in one lane, CUDA's limits kept."""
    for B, T, C, requested in itertools.product([1, 3, 64, 4096], [1, 7, 8, 64, 1000, 100_000], [1, 40, 768, 4096],
                                                [0, 1, 5, 64]):  # fmt: skip
        case = f"B={B} T={T} C={C} requested={requested}"
        len_, grid_x, grid_y, block_x, block_y = gpu_kernels_on_cpu.geometry(B, T, C, requested)
        chunks = -(-T // len_)
        assert 1 <= len_ <= T and chunks <= 32 and block_y == chunks, case
        assert (chunks - 1) * len_ < T <= chunks * len_, case  # the last chunk holds at least one token
        assert block_x * block_y <= 1024 and block_x % 32 == 0, case
        assert grid_y == B and (grid_x - 1) * block_x < C <= grid_x * block_x, case
        if requested >= T or (requested == 0 and T < 16):
            assert chunks == 1, case  # one sweep: short sequences, or a chunk length covering them
