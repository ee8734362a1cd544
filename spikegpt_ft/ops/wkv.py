"""The WKV operator of SpikeGPT's time mix, as a compiled kernel with an autograd Function.

For each channel, with ``w = -exp(time_decay)`` and ``u = time_first``::

    wkv_t = (sum_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u+k_t} v_t) / (sum_{i<t} e^{(t-1-i)w + k_i} + e^{u+k_t})

computed with the running state ``(a, b, p)`` (numerator, denominator, shared exponent) described in
``docs/spikegpt-model.md``. The kernels (``csrc/``) take that state in and give it back, so a
long sequence, a parallel prefix and token-by-token decoding are all the same call. The kernels keep
no per-token scratch, so there is no maximum sequence length. They can also cut the tokens into
chunks run in parallel (``chunk_len``; see ``csrc/wkv_core.h``): the GPU does so by default to
keep all its cores busy, the CPU does not need to, and the tests run both ways. Given the receptance,
the kernels also apply the time mix's gate ``sigmoid(r) * wkv`` in the same pass.

Gradients flow to ``time_decay``, ``time_first``, ``k``, ``v`` (and the receptance); the carried state is
treated as a constant (truncated back-propagation at the point where a state is passed in).
"""

from __future__ import annotations

import torch

from .extension import extension, needs_autograd

#: ``p`` of a fresh state: "minus infinity" that stays finite under addition.
FRESH_EXPONENT = -1e38


def _on_device(kernel, *args: torch.Tensor | int | None) -> tuple[torch.Tensor, ...]:
    """Call a kernel with the first argument's GPU current and its current stream (0 on the CPU)."""
    device = args[0].device
    if device.type != "cuda":
        return kernel(*args, 0)
    with torch.cuda.device(device):
        return kernel(*args, torch.cuda.current_stream(device).cuda_stream)


class WKVFunction(torch.autograd.Function):
    """Autograd wrapper of the compiled forward and backward kernels (``r``: the optional fused gate)."""

    @staticmethod
    def forward(ctx, w, u, k, v, r, state, chunk_len):  # noqa: D102 - autograd protocol
        y, log_den, state_out, out = _on_device(extension().wkv_forward, w, u, k, v, r, state, chunk_len)
        ctx.save_for_backward(w, u, k, v, r, y, log_den, state)
        ctx.chunk_len = chunk_len
        ctx.mark_non_differentiable(state_out)
        return out, state_out

    @staticmethod
    def backward(ctx, grad_out, _grad_state):  # noqa: D102 - autograd protocol
        w, u, k, v, r, y, log_den, state = ctx.saved_tensors
        gout = grad_out.contiguous()
        gw, gu, gk, gv, gr = _on_device(extension().wkv_backward, w, u, k, v, r, y, log_den, gout, state, ctx.chunk_len)
        # gw and gu come as one row per (sequence, chunk)
        gr = None if r is None else gr.to(r.dtype)
        return gw.sum(0), gu.sum(0), gk.to(k.dtype), gv.to(v.dtype), gr, None, None


def fresh_state(batch_size: int, channels: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The WKV state ``[B, 3, C]`` before any token: ``a = b = 0``, ``p`` = "minus infinity"."""
    state = torch.zeros(batch_size, 3, channels, device=device, dtype=torch.float32)
    state[:, 2] = FRESH_EXPONENT
    return state


def wkv(
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    chunk_len: int = 0,
    receptance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV over ``k, v`` of shape ``[B, T, C]`` from ``state`` ``[B, 3, C]``; returns ``(wkv, state_out)``.

    With ``receptance`` ``r`` (``[B, T, C]``) the first result is the time mix's gated output
    ``sigmoid(r) * wkv`` instead, computed in the kernels' own pass (forward and backward) rather than by
    three more elementwise passes over memory.

    The result has the dtype of ``k``; the recurrence runs in float32 (on the CPU, float64 for float64
    inputs, which the tests use for gradcheck). On CUDA, float16 and bfloat16 ``k, v, r`` are read as they are.
    ``chunk_len`` > 0 runs chunks of that many tokens in parallel (0: the device's default; on CUDA at
    most 32 chunks per sequence, so a shorter length is raised to fit); the result is the same up to
    rounding.
    """
    if chunk_len < 0:
        raise ValueError(f"chunk_len must be >= 0, got {chunk_len}")
    if receptance is not None and receptance.shape != k.shape:
        raise ValueError(f"receptance must have k's shape {tuple(k.shape)}, got {tuple(receptance.shape)}")
    out_dtype = k.dtype
    compute = torch.float64 if k.dtype == torch.float64 and not k.is_cuda else torch.float32
    w = -torch.exp(time_decay.to(compute)).contiguous()
    u = time_first.to(compute).contiguous()
    element = k.dtype if k.is_cuda and k.dtype in (torch.float16, torch.bfloat16) else compute
    k, v = k.to(element).contiguous(), v.to(element).contiguous()
    r = None if receptance is None else receptance.to(element).contiguous()
    state = state.to(compute).contiguous()
    if needs_autograd(w, u, k, v, *([] if r is None else [r])):
        out, state_out = WKVFunction.apply(w, u, k, v, r, state, chunk_len)
    else:
        _, _, state_out, out = _on_device(extension().wkv_forward, w, u, k, v, r, state, chunk_len)
    return out.to(out_dtype), state_out.float()
