"""The WKV operator of SpikeGPT's time mix, as a compiled kernel with an autograd Function.

For each channel, with ``w = -exp(time_decay)`` and ``u = time_first``::

    wkv_t = (sum_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u+k_t} v_t) / (sum_{i<t} e^{(t-1-i)w + k_i} + e^{u+k_t})

computed with the running state ``(a, b, p)`` (numerator, denominator, shared exponent) described in
``docs/spikegpt-model.md``. The kernels (``cuda_ext/``) take that state in and give it back, so a
long sequence, a parallel prefix and token-by-token decoding are all the same call. The kernels keep
no per-token scratch, so there is no maximum sequence length.

Gradients flow to ``time_decay``, ``time_first``, ``k`` and ``v``; the carried state is treated as a
constant (truncated back-propagation at the point where a state is passed in).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

#: Where the kernel sources live (the repository's ``cuda_ext/``); override with SPIKEGPT_FT_CUDA_EXT.
KERNEL_DIR = Path(os.environ.get("SPIKEGPT_FT_CUDA_EXT", Path(__file__).resolve().parents[1] / "cuda_ext"))

#: ``p`` of a fresh state: "minus infinity" that stays finite under addition.
FRESH_EXPONENT = -1e38


def _cuda_buildable() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.cuda.is_available() and torch.version.cuda is not None and CUDA_HOME is not None


@functools.cache
def extension(with_cuda: bool | None = None) -> ModuleType:
    """Build (once per machine, cached by ninja) and import the WKV extension.

    torch.utils.cpp_extension keys the build directory on the sources and flags, rebuilds only
    when they change, and holds a file lock so that a second process waits rather than rebuilds.
    """
    from torch.utils.cpp_extension import load

    with_cuda = _cuda_buildable() if with_cuda is None else with_cuda
    sources = [KERNEL_DIR / "wkv_ops.cpp", KERNEL_DIR / "wkv_cpu.cpp"]
    if with_cuda:
        sources.append(KERNEL_DIR / "wkv_cuda.cu")
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise FileNotFoundError(
            f"WKV kernel sources not found: {missing}. Install the project editable "
            "(pip install -e .) from its repository, or point SPIKEGPT_FT_CUDA_EXT at its cuda_ext/."
        )
    log.info("loading the WKV extension (the first use on a machine compiles it, about a minute)")
    return load(
        name="spikegpt_wkv_cuda" if with_cuda else "spikegpt_wkv_cpu",
        sources=[str(s) for s in sources],
        # -fopenmp: at::parallel_for splits the channels over threads only when compiled with OpenMP;
        # -ffast-math: lets GCC vectorise exp/log (glibc's libmvec). The kernels use no inf/NaN.
        extra_cflags=["-O3", "-ffast-math", "-fopenmp"] + (["-DWITH_CUDA"] if with_cuda else []),
        extra_ldflags=["-fopenmp"],
        extra_cuda_cflags=["-O3", "-DWITH_CUDA"],
        with_cuda=with_cuda,
        verbose=False,
    )


def _on_device(kernel, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Call a kernel with the tensors' GPU current and its current stream (0 on the CPU)."""
    device = tensors[0].device
    if device.type != "cuda":
        return kernel(*tensors, 0)
    with torch.cuda.device(device):
        return kernel(*tensors, torch.cuda.current_stream(device).cuda_stream)


class WKVFunction(torch.autograd.Function):
    """Autograd wrapper of the compiled forward and backward kernels."""

    @staticmethod
    def forward(ctx, w, u, k, v, state):  # noqa: D102 - autograd protocol
        y, log_den, state_out = _on_device(extension().forward, w, u, k, v, state)
        ctx.save_for_backward(w, u, k, v, y, log_den, state)
        ctx.mark_non_differentiable(state_out)
        return y, state_out

    @staticmethod
    def backward(ctx, grad_y, _grad_state):  # noqa: D102 - autograd protocol
        w, u, k, v, y, log_den, state = ctx.saved_tensors
        gw, gu, gk, gv = _on_device(extension().backward, w, u, k, v, y, log_den, grad_y.contiguous(), state)
        return gw.sum(0), gu.sum(0), gk.to(k.dtype), gv.to(v.dtype), None


def fresh_state(batch_size: int, channels: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The WKV state ``[B, 3, C]`` before any token: ``a = b = 0``, ``p`` = "minus infinity"."""
    state = torch.zeros(batch_size, 3, channels, device=device, dtype=torch.float32)
    state[:, 2] = FRESH_EXPONENT
    return state


def wkv(
    time_decay: torch.Tensor, time_first: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV over ``k, v`` of shape ``[B, T, C]`` from ``state`` ``[B, 3, C]``; returns ``(wkv, state_out)``.

    ``wkv`` has the dtype of ``k``; the recurrence runs in float32 (float64 for float64 inputs, which
    the tests use for gradcheck). On CUDA, float16 and bfloat16 ``k, v`` are read as they are.
    """
    out_dtype = k.dtype
    compute = torch.float64 if k.dtype == torch.float64 else torch.float32
    w = -torch.exp(time_decay.to(compute)).contiguous()
    u = time_first.to(compute).contiguous()
    if k.is_cuda and k.dtype in (torch.float16, torch.bfloat16):
        k, v = k.contiguous(), v.to(k.dtype).contiguous()
    else:
        k, v = k.to(compute).contiguous(), v.to(compute).contiguous()
    y, state_out = WKVFunction.apply(w, u, k, v, state.to(compute).contiguous())
    return y.to(out_dtype), state_out.float()
