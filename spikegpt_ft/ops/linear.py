"""Linear layers with compiled CPU products for decoding: bfloat16 for a few rows, and int8 weights.

Decoding one sequence at a time reads every weight once per token, so on a CPU it runs at the speed of
memory. :class:`Linear` is the ``nn.Linear`` every SpikeGPT layer is built from: whenever it runs on the
CPU in bfloat16 for one or two rows without gradients, its product is a compiled kernel that reads the
weights about twice as fast as PyTorch's (``csrc/linear_cpu.cpp``); everything else is ``nn.Linear``'s own.
So a model put in bfloat16 by any means (``model.to(torch.bfloat16)``, ``load_model(..., dtype=...)``)
decodes on the fast path.

:class:`Int8Linear` stores a weight as int8 with one scale per output channel (symmetric, ``W ~ s * W8``
with ``s = max|W_row| / 127`` rounded up to bfloat16) and multiplies with PyTorch's own weight-only int8
kernel (``aten._weight_int8pack_mm``, the one torchao uses on the CPU): half the bytes of bfloat16.
``torch.ao.quantization.quantize_dynamic`` also quantises activations, is deprecated, and measured slower
here, so it is not used. :mod:`spikegpt_ft.inference.precision` converts whole models.
"""

from __future__ import annotations

import torch
from torch import nn

from .extension import extension, needs_autograd

#: ``_weight_int8pack_mm`` needs the input width to be a multiple of this (other widths give wrong
#: results rather than an error, so such layers are left in bfloat16).
INT8_WIDTH_MULTIPLE = 16
#: Rows up to which :class:`Linear` runs the compiled kernel (from 3 rows on PyTorch's is as fast).
DECODING_MAX_ROWS = 2


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
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        out = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Linear(nn.Linear):
    """SpikeGPT's linear layer: ``nn.Linear``, whose bfloat16 product for one or two rows on the CPU runs the kernel.

    Decoding one sequence multiplies one row by each weight matrix; PyTorch's CPU kernel for that reads the
    weights at well under the memory's speed, the compiled one about twice as fast. Every other call (more
    rows, other dtypes or devices, gradients needed) is ``nn.Linear``'s own. The result differs from
    ``nn.Linear``'s only in the order of the float32 additions before the rounding to bfloat16.
    """

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether ``self(x)`` runs the compiled kernel (at most two bfloat16 rows on the CPU, no gradient)."""
        params = (self.weight,) if self.bias is None else (self.weight, self.bias)
        return (
            x.device.type == "cpu"
            and x.dtype == torch.bfloat16
            and self.weight.device.type == "cpu"
            and self.weight.dtype == torch.bfloat16
            and 0 < x.numel() <= DECODING_MAX_ROWS * self.in_features
            and not needs_autograd(x, *params)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_kernel(x):
            return super().forward(x)
        out = extension().small_batch_linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return out.view(*x.shape[:-1], self.out_features)
