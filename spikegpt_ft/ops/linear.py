"""Linear layers with compiled CPU products for inference: bfloat16 weights, and int8 weights.

Decoding one sequence at a time reads every weight once per token, so on a CPU it runs at the speed of
memory. :class:`Linear` is the ``nn.Linear`` every SpikeGPT layer is built from; when it runs on the CPU in
bfloat16 without gradients its product is chosen by what the CPU can do (:func:`product_kernel`):

- ``stream``: the compiled streaming kernel (``csrc/linear_cpu.cpp``; AVX-512 (with VNNI, see below, and with
  AVX512-BF16, whose VDPBF16PS multiplies bfloat16 rows by a cache line of weights in one instruction) or
  AVX2+FMA, the best the CPU has, else portable C++). It reads each weight once and multiplies it with up to four
  rows of x from registers
  (prefetching the weights as measured fastest on the machine: :func:`stream_prefetch`), block by block for
  more rows, so one decoded row gets bit for bit the value it gets in a parallel pass. It runs for any number
  of rows on CPUs without bfloat16 matrix arithmetic, where PyTorch's bfloat16 product is
  emulated (a quarter of the float32 rate, BENCHMARKS.md), and for up to :data:`STREAM_MAX_ROWS` rows on
  the others;
- ``amx``: on CPUs with AMX-BF16, for more rows, the compiled AMX kernel (``csrc/amx_linear.cpp``) on a copy
  of the weight laid out for the tiles (:meth:`Linear.packed_weight`: made at the first such product, made
  again when the weight changes; it doubles the layer's weight memory);
- ``torch``: ``nn.Linear``'s own product, everywhere else: gradients, other dtypes or devices, and for more
  rows on CPUs with AVX512-BF16 but no AMX (oneDNN runs them on those units).

:class:`Int8Linear` stores a weight as int8 with one scale per output channel (symmetric, ``W ~ s * W8``
with ``s = max|W_row| / 127`` rounded up to bfloat16) and always multiplies with the streaming kernel's entry
(``stream_linear``): half the bytes of bfloat16, any width. On CPUs with AVX512-VNNI its bfloat16 rows go in as
integers (``csrc/int8_digits.h``: three byte digits of each row scaled by a power of two) and the sums are exact,
on VNNI for up to four rows and on AMX-INT8, where the CPU has it, for more (``amx-int8``).
``torch.ao.quantization.quantize_dynamic`` also quantises activations, and PyTorch's weight-only int8 kernel
(``aten._weight_int8pack_mm``) needs widths that are multiples of 16 and ran at a quarter of the memory's speed
here, so neither is used. :mod:`spikegpt_ft.inference.precision`
converts whole models.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..system import cpu_flags
from .extension import extension, needs_autograd

#: Rows up to which the streaming kernel runs even where the CPU has bfloat16 matrix units (there it is as
#: fast as memory and oneDNN's product is not; from here on oneDNN's is faster).
STREAM_MAX_ROWS = 4
#: The streaming kernels that multiply int8 weights by bfloat16 rows in integers (csrc/int8_digits.h).
INTEGER_KERNELS = frozenset({"avx512-bf16", "avx512-vnni"})
#: CPU flags of bfloat16 matrix arithmetic that oneDNN uses.
BF16_MATRIX_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def has_bf16_matrix_units() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX-BF16)."""
    return bool(cpu_flags() & BF16_MATRIX_FLAGS)


@functools.cache
def amx_usable() -> bool:
    """Whether this process runs the AMX product (the CPU has AMX-BF16, the build has the kernel, Linux allows it)."""
    return bool(extension().amx_usable())


def matrix_kernel() -> str | None:
    """The product for more than :data:`STREAM_MAX_ROWS` bfloat16 rows where the CPU has bfloat16 matrix units:
    ``amx`` (this package's AMX kernel) or ``torch`` (oneDNN), ``None`` where it has none (the streaming kernel)."""
    if not has_bf16_matrix_units():
        return None
    return "amx" if amx_usable() else "torch"


@functools.cache
def stream_kernel() -> str:
    """The streaming kernel this CPU runs: ``avx512-bf16`` (``avx512-vnni`` with bfloat16 weights by bfloat16 rows
    on VDPBF16PS), ``avx512-vnni`` (``avx512`` with int8 weights in integers), ``avx512`` (AVX-512F), ``avx2``
    (AVX2 and FMA) or ``portable``."""
    return extension().linear_kernels()[0]


@functools.cache
def int8_amx_usable() -> bool:
    """Whether :class:`Int8Linear` products of more than :data:`STREAM_MAX_ROWS` rows run on AMX-INT8 here (the
    CPU has it and VNNI, the build has the kernel, Linux allows it)."""
    return stream_kernel() in INTEGER_KERNELS and bool(extension().amx_int8_usable())


def stream_prefetch() -> str:
    """How the streaming kernel prefetches weights that come from memory on this machine: ``l1-2k`` (2 KiB ahead
    into the L1 cache), ``l2-16k`` (16 KiB ahead into the L2) or ``none`` (no vector kernel). Measured once per
    process, at the first call (34 - 44 ms on the Intel Xeon of BENCHMARKS.md), since the faster one depends on the
    machine; it changes no value."""
    return extension().stream_prefetch()


def set_stream_prefetch(name: str) -> None:
    """Use the prefetch ``name`` (``l1-2k`` or ``l2-16k``) from now on in this process, or the measured one again
    (``auto``); an unknown name is refused. The measurement chose the slower one in about one process in a hundred
    on the Intel Xeon of BENCHMARKS.md (its steps 1.3 x slower), so a deployment that knows its machine can fix
    the choice. It changes no value, only the speed."""
    extension().set_stream_prefetch(name)


def product_kernel(rows: int, weight_dtype: torch.dtype) -> str:
    """The product a CPU inference layer uses for ``rows`` rows: ``stream-`` and the streaming kernel that runs it
    (:func:`stream_kernel`'s, except that ``avx512-bf16`` passes int8 weights to ``avx512-vnni``), ``amx``
    (bfloat16 weights), ``amx-int8`` (int8 weights) or ``torch``."""
    if rows > STREAM_MAX_ROWS:
        if weight_dtype == torch.bfloat16:
            matrix = matrix_kernel()
            if matrix is not None:
                return matrix
        elif weight_dtype == torch.int8 and int8_amx_usable():
            return "amx-int8"
    kernel = stream_kernel()
    if kernel == "avx512-bf16" and weight_dtype == torch.int8:
        kernel = "avx512-vnni"
    return f"stream-{kernel}"


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


def compiled_product(rows: int, x_dtype: torch.dtype, weight_dtype: torch.dtype) -> str | None:
    """The compiled kernel of a :class:`Linear` inference product of ``rows`` rows on the CPU: ``stream``, ``amx``,
    or ``None`` for ``nn.Linear``'s own.

    bfloat16 input and weight, and the CPU's choice of kernel for that many rows (:func:`product_kernel`).
    """
    if x_dtype != torch.bfloat16 or weight_dtype != torch.bfloat16 or rows <= 0:
        return None
    kernel = product_kernel(rows, torch.bfloat16)
    return None if kernel == "torch" else kernel.split("-")[0]


def inference_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> str | None:
    """The compiled kernel of the product ``x W^T (+ bias)`` (``stream`` or ``amx``: bfloat16 on the CPU, no
    gradient, the CPU's choice for that many rows, :func:`compiled_product`), or ``None`` for ``F.linear``."""
    # the dtype first: float32 layers, the training path, answer after one comparison
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or weight.device.type != "cpu":
        return None
    if needs_autograd(x, *((weight,) if bias is None else (weight, bias))):
        return None
    return compiled_product(x.numel() // weight.shape[1], x.dtype, weight.dtype)


def streams_unpacked(rows: int, x_dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """Whether :func:`unpacked_linear` streams ``rows`` rows (without gradients, on the CPU): up to
    :data:`STREAM_MAX_ROWS` rows where a :class:`Linear` would stream them.

    Above that, ``F.linear``: the streaming kernel sums an adapter's ``B`` (a reduction as short as the rank) one
    element after the other, which at 64 rows took 200 us against oneDNN's 26 us (rank 8, 768 outputs, the Intel
    Xeon of BENCHMARKS.md).
    """
    return rows <= STREAM_MAX_ROWS and compiled_product(rows, x_dtype, weight_dtype) == "stream"


def unpacked_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for a weight that is no :class:`Linear`'s (an adapter's ``A`` or ``B``), through the
    streaming kernel where :func:`streams_unpacked` says so and no gradient is needed.

    At one row, ``F.linear`` of a bfloat16 rank-8 adapter matrix took 21 - 24 us on the Intel Xeon of
    BENCHMARKS.md (oneDNN's fixed cost), the streaming kernel 1.6 us for ``A`` (768 inputs) and 4.5 us for ``B``
    (768 outputs); a SpikeLoRA model has two per linear layer.
    """
    rows = x.numel() // weight.shape[1]
    if inference_kernel(x, weight) is None or not streams_unpacked(rows, x.dtype, weight.dtype):
        return F.linear(x, weight)
    out = extension().stream_linear(x.reshape(rows, weight.shape[1]), weight, None, None, "auto")
    return out.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """SpikeGPT's linear layer: ``nn.Linear``, whose bfloat16 CPU inference product is :func:`product_kernel`'s.

    The result differs from ``nn.Linear``'s only in the order of the float32 additions before the rounding
    to bfloat16 (and, on AMX, in denormal products counting as zero, as in oneDNN's).
    """

    #: The weight laid out for the AMX kernel; the weight it was made from (a view, which keeps its memory from
    #: being reused by another tensor) and that weight's version then.
    _packed: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def kernel_for(self, x: torch.Tensor) -> str | None:
        """The compiled kernel ``self(x)`` runs (:func:`inference_kernel`), or ``None`` for ``nn.Linear``'s product."""
        return inference_kernel(x, self.weight, self.bias)

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether ``self(x)`` runs a compiled kernel (:meth:`kernel_for`)."""
        return self.kernel_for(x) is not None

    def packed_weight(self) -> torch.Tensor:
        """The weight laid out for the AMX kernel: made at the first call and kept, made again whenever the
        weight has changed since (in place, or replaced).

        A weight made under ``torch.inference_mode`` has no version counter to tell a change by: its layout is
        made at every call (correct, at the cost of a copy of the weight per product).
        """
        weight = self.weight
        if weight.is_inference():
            warnings.warn(
                "a bfloat16 weight made under torch.inference_mode is laid out for the AMX kernel again at every "
                "product (it has no version counter to tell a change by): cast or load the model outside "
                "inference mode to keep the layout",
                stacklevel=2,
            )
            return extension().amx_pack_weight(weight.detach())
        if self._packed is not None:
            packed, made_from, version = self._packed
            if made_from.data_ptr() == weight.data_ptr() and version == weight._version:
                return packed
        made_from = weight.detach()
        self._packed = (extension().amx_pack_weight(made_from), made_from, weight._version)
        return self._packed[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel_for(x)
        if kernel is None:
            return super().forward(x)
        rows = x.reshape(-1, self.in_features)
        if kernel == "amx":
            out = extension().amx_linear(rows, self.packed_weight(), self.out_features, self.bias)
        else:
            out = extension().stream_linear(rows, self.weight, None, self.bias, "auto")
        return out.view(*x.shape[:-1], self.out_features)
