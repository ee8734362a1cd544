"""Lower-precision weights for inference: bfloat16, or int8 weight-only quantisation for CPU decoding.

Decoding one sequence at a time reads every weight once per token, so on a CPU it runs at the speed of
memory: halving the bytes of the weights halves the time of a step. ``int8`` stores each linear layer's
weight as int8 with one scale per output channel (symmetric, round to nearest, ``W ~ s * W8`` with
``s = max|W_row| / 127``) and multiplies with PyTorch's own weight-only int8 kernel
(``aten._weight_int8pack_mm``, the one torchao uses on the CPU); activations stay bfloat16 and the
recurrent state float32. ``torch.ao.quantization.quantize_dynamic`` also quantises activations, is
deprecated, and measured slower here, so it is not used.

In bfloat16 on the CPU, linear layers become :class:`DecodingLinear`: the same ``nn.Linear``, whose
product for one or two rows (decoding one or two sequences) runs a compiled kernel that reads the weights
about twice as fast as PyTorch's (``cuda_ext/linear_cpu.cpp``).

The spiking nonlinearities are thresholds, so a small change of a weight can flip a spike: measure the
accuracy of a quantised classifier (``python infer.py --checkpoint RUN --evaluate --weights int8``)
before relying on it. See ``BENCHMARKS.md`` for measured speed and accuracy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .extension import extension, needs_autograd

#: The weight precisions ``cast_weights`` accepts.
WEIGHT_PRECISIONS = ("float32", "bfloat16", "int8")
#: ``_weight_int8pack_mm`` needs the input width to be a multiple of this (other widths give wrong
#: results rather than an error, so such layers are left in bfloat16).
INT8_WIDTH_MULTIPLE = 16
#: Rows up to which :class:`DecodingLinear` runs the compiled kernel (from 3 rows on PyTorch's is as fast).
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


class DecodingLinear(nn.Linear):
    """An ``nn.Linear`` whose bfloat16 product for one or two rows on the CPU runs the compiled kernel.

    Decoding one sequence multiplies one row by each weight matrix; PyTorch's CPU kernel for that reads the
    weights at well under the memory's speed, the compiled one about twice as fast. Every other call (more
    rows, other dtypes or devices, gradients needed) is ``nn.Linear``'s own. The result differs from
    ``nn.Linear``'s only in the order of the float32 additions before the rounding to bfloat16.
    """

    @classmethod
    def sharing(cls, linear: nn.Linear) -> DecodingLinear:
        """A ``DecodingLinear`` holding ``linear``'s own weight and bias tensors (nothing is copied)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

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


def _replace_linears(model: nn.Module, names: list[str], make: Callable[[nn.Linear], nn.Module]) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, make(getattr(parent, child)))


def quantize_int8(model: nn.Module) -> list[str]:
    """Replace, in place, every ``nn.Linear`` of ``model`` by an :class:`Int8Linear`; returns their names.

    In an adapter only the frozen base layer is an ``nn.Linear``; its LoRA matrices stay as they are.
    Layers whose input width is not a multiple of 16 stay as they are. The model must be on the CPU.
    """
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cpu"}:
        raise ValueError(f"int8 weights are a CPU decoding option; the model is on {sorted(devices)}")
    names = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.in_features % INT8_WIDTH_MULTIPLE == 0
    ]
    _replace_linears(model, names, Int8Linear)
    return names


def cast_weights(model: nn.Module, precision: str) -> nn.Module:
    """Put ``model``'s weights in ``precision`` (one of :data:`WEIGHT_PRECISIONS`) for inference, in place.

    ``int8`` means int8 linear layers (see :func:`quantize_int8`) and bfloat16 for everything else. On the
    CPU, the bfloat16 linear layers become :class:`DecodingLinear` (same weights, faster for one or two rows).
    """
    if precision not in WEIGHT_PRECISIONS:
        raise ValueError(f"unknown weight precision {precision!r}; choose one of {', '.join(WEIGHT_PRECISIONS)}")
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        raise ValueError("this model's weights are int8 already; load it again to change their precision")
    if precision == "float32":
        return model.float()
    model.to(torch.bfloat16)
    if precision == "int8":
        quantize_int8(model)
    if {p.device.type for p in model.parameters()} == {"cpu"}:
        plain = [name for name, m in model.named_modules() if type(m) is nn.Linear]
        _replace_linears(model, plain, DecodingLinear.sharing)
    return model
