"""Linear layers with compiled CPU products for inference: bfloat16 weights, and int8 weights.

Decoding one sequence at a time reads every weight once per token, so on a CPU it runs at the speed of
memory. :class:`Linear` is the ``nn.Linear`` every SpikeGPT layer is built from; when it runs on the CPU in
bfloat16 without gradients its product is chosen by what the CPU can do (:func:`product_kernel`):

- ``stream``: the compiled streaming kernel (``csrc/linear_cpu.cpp``; AVX-512 or AVX2+FMA, the best the CPU
  has, else portable C++). It reads each weight once and multiplies it with up to four rows of x from registers, block
  by block for more rows, so one decoded row gets bit for bit the value it gets in a parallel pass. It runs
  for any number of rows on CPUs without bfloat16 matrix arithmetic, where PyTorch's bfloat16 product is
  emulated (a quarter of the float32 rate, BENCHMARKS.md), and for up to :data:`STREAM_MAX_ROWS` rows on
  the others;
- ``torch``: ``nn.Linear``'s own product, everywhere else: gradients, other dtypes or devices, and on CPUs
  with AVX512-BF16 or AMX-BF16 for more rows (oneDNN runs them on those units).

:class:`Int8Linear` stores a weight as int8 with one scale per output channel (symmetric, ``W ~ s * W8``
with ``s = max|W_row| / 127`` rounded up to bfloat16) and always multiplies with the streaming kernel: half
the bytes of bfloat16, any width. ``torch.ao.quantization.quantize_dynamic`` also quantises activations,
and PyTorch's weight-only int8 kernel (``aten._weight_int8pack_mm``) needs widths that are multiples of 16
and ran at a quarter of the memory's speed here, so neither is used. :mod:`spikegpt_ft.inference.precision`
converts whole models.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..system import cpu_flags
from .extension import extension, needs_autograd

#: Rows up to which the streaming kernel runs even where the CPU has bfloat16 matrix units (there it is as
#: fast as memory and oneDNN's product is not; from here on oneDNN's is faster).
STREAM_MAX_ROWS = 4
#: CPU flags of bfloat16 matrix arithmetic that oneDNN uses.
BF16_MATRIX_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def has_bf16_matrix_units() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX-BF16)."""
    return bool(cpu_flags() & BF16_MATRIX_FLAGS)


@functools.cache
def stream_kernel() -> str:
    """The streaming kernel this CPU runs: ``avx512`` (AVX-512F), ``avx2`` (AVX2 and FMA) or ``portable``."""
    return extension().linear_kernels()[0]


def product_kernel(rows: int, weight_dtype: torch.dtype) -> str:
    """The product a CPU inference layer uses for ``rows`` rows: ``stream-`` and :func:`stream_kernel`, or ``torch``."""
    if weight_dtype == torch.bfloat16 and rows > STREAM_MAX_ROWS and has_bf16_matrix_units():
        return "torch"
    return f"stream-{stream_kernel()}"


def _bfloat16_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest positive bfloat16 values not below ``x`` (the scales are stored in bfloat16)."""
    tiny = torch.finfo(torch.bfloat16).tiny
    rounded = x.clamp_min(tiny).to(torch.bfloat16)
    too_small = rounded.double() < x
    up = torch.nextafter(rounded, torch.tensor(float("inf"), dtype=torch.bfloat16))
    return torch.where(too_small, up, rounded)


class Int8Linear(nn.Module):
    """A bias-optional linear layer with int8 weights and one bfloat16 scale per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().double()
        scale = _bfloat16_at_least(weight.abs().amax(dim=1) / 127.0)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # |W / s| <= 127 as s was rounded up, so every weight is within s / 2 of s * W8
        self.register_buffer("weight_int8", torch.round(weight / scale.double()[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16))

    def dequantized_weight(self) -> torch.Tensor:
        """``s * W8`` in float32: the weight this layer actually multiplies by."""
        return self.weight_int8.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = extension().stream_linear(rows, self.weight_int8, self.scale, self.bias, "auto")
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def streams(rows: int, x_dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """Whether a :class:`Linear` inference product of ``rows`` rows on the CPU runs the streaming kernel.

    bfloat16 input and weight, and the CPU's choice of kernel for that many rows (:func:`product_kernel`).
    """
    return (
        x_dtype == torch.bfloat16
        and weight_dtype == torch.bfloat16
        and rows > 0
        and product_kernel(rows, torch.bfloat16) != "torch"
    )


class Linear(nn.Linear):
    """SpikeGPT's linear layer: ``nn.Linear``, whose bfloat16 CPU inference product is :func:`product_kernel`'s.

    The result differs from ``nn.Linear``'s only in the order of the float32 additions before the rounding
    to bfloat16.
    """

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether ``self(x)`` runs the streaming kernel (bfloat16 on the CPU, no gradient, the CPU's choice)."""
        # the dtype first: float32 layers, the training path, answer after one comparison
        return (
            x.dtype == torch.bfloat16
            and streams(x.numel() // self.in_features, x.dtype, self.weight.dtype)
            and x.device.type == "cpu"
            and self.weight.device.type == "cpu"
            and not needs_autograd(x, *((self.weight,) if self.bias is None else (self.weight, self.bias)))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_kernel(x):
            return super().forward(x)
        out = extension().stream_linear(x.reshape(-1, self.in_features), self.weight, None, self.bias, "auto")
        return out.view(*x.shape[:-1], self.out_features)
