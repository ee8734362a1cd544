"""The compiled WKV kernels against a plain PyTorch reference written here, and the CUDA sources' build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import include_paths

from spikegpt_ft.ops.extension import CUDA_SOURCES, KERNEL_DIR
from spikegpt_ft.ops.wkv import fresh_state, wkv


def direct_wkv(time_decay, time_first, k, v, state=None):
    """The defining sums of the WKV operator, evaluated directly (no running state), in float64.

    With an initial state (a0, b0, p0) the sums gain e^{t w} * e^{p0} * (a0, b0) at token t.
    """
    w = -torch.exp(time_decay)
    B, T, C = k.shape
    t = torch.arange(T, dtype=k.dtype)
    lag = (t[:, None] - 1 - t[None, :]).clamp(min=0)  # (t-1-i) for i < t
    earlier = (t[None, :] < t[:, None]).to(k.dtype)  # [T, T] mask i < t
    weights = torch.exp(lag[None, :, :, None] * w + k[:, None, :, :]) * earlier[None, :, :, None]  # [B,T,T,C]
    now = torch.exp(time_first + k)
    num = (weights * v[:, None]).sum(2) + now * v
    den = weights.sum(2) + now
    if state is not None:
        decay = torch.exp(t[None, :, None] * w + state[:, None, 2])
        num = num + decay * state[:, None, 0]
        den = den + decay * state[:, None, 1]
    return num / den


def recurrent_wkv(time_decay, time_first, k, v, state):
    """The stable one-token-at-a-time recurrence of the model doc, as a Python loop over tokens."""
    w, u = -torch.exp(time_decay), time_first
    a, b, p = state[:, 0], state[:, 1], state[:, 2]
    out = []
    for t in range(k.shape[1]):
        kt, vt = k[:, t], v[:, t]
        q = torch.maximum(p, u + kt)
        e1, e2 = torch.exp(p - q), torch.exp(u + kt - q)
        out.append((e1 * a + e2 * vt) / (e1 * b + e2))
        q = torch.maximum(p + w, kt)
        e1, e2 = torch.exp(p + w - q), torch.exp(kt - q)
        a, b, p = e1 * a + e2 * vt, e1 * b + e2, q
    return torch.stack(out, 1), torch.stack([a, b, p], 1)


def random_inputs(B, T, C, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    td = torch.rand(C, generator=g, dtype=dtype) * 4 - 3
    tf = torch.rand(C, generator=g, dtype=dtype) * 2 - 1
    k = torch.randn(B, T, C, generator=g, dtype=dtype) * scale
    v = torch.randn(B, T, C, generator=g, dtype=dtype)
    return td, tf, k, v


#: Chunk lengths the tests run: 0 (one chunk, the CPU default) and the GPU kernels' chunked scheme,
#: down to one token per chunk and with a short last chunk.
CHUNKS = [0, 1, 3, 4]


def receptance_like(k, gated, seed=10, scale=3.0):
    """A receptance for the fused gate (None: no gate), spread enough to reach both tails of the sigmoid."""
    if not gated:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k.shape, generator=g, dtype=k.dtype) * scale


def gate(r, y):
    """The time mix's gate written out: ``sigmoid(r) * y`` (``y`` itself without a receptance)."""
    return y if r is None else torch.sigmoid(r) * y


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("chunk_len", CHUNKS)
def test_forward_matches_direct_sums_fresh_and_carried_state(chunk_len, gated):
    td, tf, k, v = random_inputs(2, 9, 5)
    r = receptance_like(k, gated)
    y, state = wkv(td, tf, k, v, fresh_state(2, 5).double(), chunk_len, receptance=r)
    assert torch.allclose(y, gate(r, direct_wkv(td, tf, k, v)), atol=1e-12, rtol=1e-10)
    # continue from the carried state: same as running the whole sequence at once
    td2, tf2, k2, v2 = random_inputs(2, 7, 5, seed=1)
    r2 = receptance_like(k2, gated, seed=11)
    y2, _ = wkv(td, tf, k2, v2, state.double(), chunk_len, receptance=r2)
    whole = direct_wkv(td, tf, torch.cat([k, k2], 1), torch.cat([v, v2], 1))
    assert torch.allclose(y2, gate(r2, whole[:, 9:]), atol=1e-6, rtol=1e-6)  # state is float32


@pytest.mark.parametrize("gated", [False, True])
def test_call_without_gradients_equals_the_autograd_call(gated):
    """Without anything to differentiate the kernel is called directly; the results are the same bits."""
    td, tf, k, v = random_inputs(2, 9, 5)
    r = receptance_like(k, gated)
    state = fresh_state(2, 5).double()
    with torch.no_grad():
        y_plain, s_plain = wkv(td, tf, k, v, state, receptance=r)
    k.requires_grad_(True)
    y_grad, s_grad = wkv(td, tf, k, v, state, receptance=r)
    assert y_plain.grad_fn is None and y_grad.grad_fn is not None
    assert torch.equal(y_plain, y_grad.detach()) and torch.equal(s_plain, s_grad)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("chunk_len", [0, 1, 4])
@pytest.mark.parametrize("carried", [False, True])
def test_gradcheck_float64(carried, chunk_len, gated):
    td, tf, k, v = random_inputs(2, 6, 3, seed=2)
    state = fresh_state(2, 3).double()
    if carried:
        _, state = recurrent_wkv(td, tf, *random_inputs(2, 4, 3, seed=3)[2:], state)
    inputs = [x.clone().requires_grad_() for x in (td, tf, k, v)]
    if gated:
        inputs.append(receptance_like(k, gated).requires_grad_())

    def gated_wkv(td, tf, k, v, r=None):
        return wkv(td, tf, k, v, state, chunk_len, receptance=r)[0]

    assert torch.autograd.gradcheck(gated_wkv, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("chunk_len", CHUNKS)
def test_backward_matches_reference_autograd(chunk_len, gated):
    td, tf, k, v = random_inputs(3, 20, 16, dtype=torch.float32, seed=4, scale=3.0)
    r = receptance_like(k, gated, scale=10.0)  # saturates the sigmoid at both ends too
    gy = torch.randn(3, 20, 16)
    ours = [x.clone().requires_grad_() for x in (td, tf, k, v) + ((r,) if gated else ())]
    ref = [x.double().requires_grad_() for x in (td, tf, k, v) + ((r,) if gated else ())]
    (wkv(*ours[:4], fresh_state(3, 16), chunk_len, receptance=ours[4] if gated else None)[0] * gy).sum().backward()
    y_ref = recurrent_wkv(*ref[:4], fresh_state(3, 16).double())[0]
    (gate(ref[4] if gated else None, y_ref) * gy.double()).sum().backward()
    for a, b in zip(ours, ref, strict=True):
        assert torch.allclose(a.grad.double(), b.grad, atol=1e-4 * b.grad.abs().max().item())


def test_gate_stays_finite_at_extreme_receptance():
    """|r| beyond float32's exp range: outputs and gradients are finite; the gate is exactly 0 or 1 at +-1e4."""
    td, tf, k, v = random_inputs(1, 8, 4, dtype=torch.float32, seed=12)
    r = torch.tensor([-1e4, -100.0, 100.0, 1e4]).expand(1, 8, 4).clone().requires_grad_()
    out, _ = wkv(td, tf, k, v, fresh_state(1, 4), receptance=r)
    y, _ = wkv(td, tf, k, v, fresh_state(1, 4))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(r.grad).all()
    assert torch.equal(out[..., 0], torch.zeros(1, 8))
    # sigmoid(1e4) is 1 in float32, so out = y; but the gated and ungated kernels are separate compiled
    # instantiations, which the compiler may contract into fused multiply-adds differently (seen on AVX2):
    # their y agree to one float32 ulp, not bitwise
    assert torch.all((out[..., 3] - y[..., 3]).abs() <= torch.finfo(torch.float32).eps * y[..., 3].abs())
    assert (out - torch.sigmoid(r) * y).abs().max() <= 1e-6 * y.abs().max()


def test_receptance_of_another_shape_is_refused():
    td, tf, k, v = random_inputs(1, 4, 2)
    with pytest.raises(ValueError, match="receptance must have k's shape"):
        wkv(td, tf, k, v, fresh_state(1, 2).double(), receptance=torch.zeros(1, 3, 2, dtype=torch.float64))


@pytest.mark.parametrize("chunk_len", [0, 97])
def test_long_sequence_matches_reference(chunk_len):
    """T = 3000: no hidden length limit, forward and backward agree with the token loop."""
    td, tf, k, v = random_inputs(2, 3000, 8, dtype=torch.float32, seed=5, scale=2.0)
    ours = [x.clone().requires_grad_() for x in (td, tf, k, v)]
    ref = [x.double().requires_grad_() for x in (td, tf, k, v)]
    y, state = wkv(*ours, fresh_state(2, 8), chunk_len)
    y_ref, state_ref = recurrent_wkv(*ref, fresh_state(2, 8).double())
    assert (y.double() - y_ref).abs().max() < 1e-4
    assert torch.allclose(state[:, 2].double(), state_ref[:, 2], atol=1e-3)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    (y_ref * gy.double()).sum().backward()
    for a, b in zip(ours, ref, strict=True):
        assert (a.grad.double() - b.grad).abs().max() < 1e-3 * b.grad.abs().max()


@pytest.mark.parametrize("chunk_len", [0, 8])
def test_large_keys_do_not_overflow(chunk_len):
    td, tf, k, v = random_inputs(1, 50, 4, dtype=torch.float32, seed=6)
    k = k * 40  # e^{k} alone overflows float32
    ours = [x.clone().requires_grad_() for x in (td, tf, k, v)]
    y, _ = wkv(*ours, fresh_state(1, 4), chunk_len)
    y.sum().backward()
    assert torch.isfinite(y).all() and all(torch.isfinite(x.grad).all() for x in ours)
    y_ref, _ = recurrent_wkv(*(x.double() for x in (td, tf, k, v)), fresh_state(1, 4).double())
    assert (y.double() - y_ref).abs().max() < 1e-4


@pytest.mark.parametrize("chunk_len", [1, 5, 16])
def test_chunked_state_out_matches_one_chunk(chunk_len):
    """The state handed on after a chunked pass is the one a single sweep reaches, from fresh and carried states."""
    td, tf, k, v = random_inputs(3, 37, 6, seed=7, scale=2.0)
    for state in (fresh_state(3, 6).double(), recurrent_wkv(td, tf, k[:, :5], v[:, :5], fresh_state(3, 6).double())[1]):
        _, one = wkv(td, tf, k, v, state)
        _, chunked = wkv(td, tf, k, v, state, chunk_len)
        _, ref = recurrent_wkv(td, tf, k, v, state)
        for got in (one, chunked):  # the state handed on is float32
            assert torch.allclose(got.double(), ref, rtol=1e-6, atol=1e-7)


def test_negative_chunk_len_is_refused():
    td, tf, k, v = random_inputs(1, 4, 2)
    with pytest.raises(ValueError, match="chunk_len must be >= 0"):
        wkv(td, tf, k, v, fresh_state(1, 2).double(), -1)


def _cuda_include() -> str:
    return str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed on this machine")
def test_cuda_sources_compile(tmp_path):
    """Nothing built from the CUDA sources runs without a GPU, but they must compile: the kernels
    with nvcc alone, the bindings WITH_CUDA against the installed torch headers."""
    for source in CUDA_SOURCES:
        kernels = subprocess.run(
            [
                "nvcc",
                "-c",
                "-O3",
                "-std=c++17",
                "-arch=sm_80",
                str(KERNEL_DIR / source),
                "-o",
                str(tmp_path / f"{source}.o"),
            ],
            capture_output=True,
            text=True,
        )
        assert kernels.returncode == 0, f"{source}: {kernels.stderr}"
    includes = [f"-I{p}" for p in [*include_paths(), _cuda_include()]]
    bindings = subprocess.run(
        [
            "g++",
            "-fsyntax-only",
            "-std=c++17",
            "-DWITH_CUDA",
            "-DTORCH_EXTENSION_NAME=wkv_check",
            *includes,
            f"-I{sysconfig.get_paths()['include']}",
            str(KERNEL_DIR / "ops.cpp"),
        ],
        capture_output=True,
        text=True,
    )
    assert bindings.returncode == 0, bindings.stderr
