"""One recurrent step through a stack of SpikeGPT blocks in a single compiled call (CPU decoding).

At batch 1 a step of SpikeGPT is some 25 tiny operations per block, and from Python each costs microseconds
of interpreter and module dispatch: at 18 layers that is milliseconds per token, whatever the width
(BENCHMARKS.md, "step overhead"). :func:`decode_blocks` runs the blocks' operations from C++
(``csrc/decode_cpu.cpp``): the same WKV, LIF and product kernels and ATen's LayerNorm, mix, exp and
sigmoid, the conversions and two-operand sums and products as loops of its own (rounded as ATen rounds), in
the same dtypes and order as the modules, so its results are bitwise those of ``model.step`` (the reference;
the tests compare the two).

It applies to blocks built as :class:`~spikegpt_ft.model.SpikeGPT` builds them: LayerNorms, the ops'
:class:`~spikegpt_ft.ops.Linear` or :class:`~spikegpt_ft.ops.Int8Linear` without bias, and
:class:`~spikegpt_ft.ops.CompiledLIFNode` with the kernel's settings, none with forward hooks. A linear layer
may carry a LoRA or SpikeLoRA update (:class:`ProductOperands` with ``lora_A``/``lora_B`` and a gate); the
adapters describe theirs themselves (``AdapterLinear.decode_operands``), passed in as ``product``.
:func:`block_operands` says whether a block is such a one and collects its tensors; anything else (a hook,
a subclass, another neuron) makes it ``None``, and the caller then runs the modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .extension import extension
from .lif import CompiledLIFNode
from .linear import Int8Linear, Linear, compiled_product

#: The parameters of a block in the kernel's order (``Slot`` in ``csrc/decode_cpu.cpp``), before the products.
MIX_TENSORS = (
    "att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "att.time_decay", "att.time_first",
    "ffn.time_mix_k", "ffn.time_mix_r",
)  # fmt: skip
#: The block's linear layers, in the kernel's order (``Product`` in ``csrc/decode_cpu.cpp``).
PRODUCTS = ("att.key", "att.value", "att.receptance", "att.output", "ffn.key", "ffn.receptance", "ffn.value")
#: The block's LayerNorms (``ln0`` only in block 0) and its two LIF layers.
LAYER_NORMS = ("ln0", "ln1", "ln2")
NEURONS = ("lif1", "lif2")
#: An adapter's gate, as the kernel numbers it.
GATES = {None: 0, "temporal": 1, "pointwise": 2}
#: How a product is multiplied, as the kernel numbers it (``Kernel`` in ``csrc/decode_cpu.cpp``).
KERNELS = {"aten": 0, "stream": 1, "amx": 2}


@dataclass(frozen=True)
class ProductOperands:
    """One linear layer as the kernel multiplies it: ``x W^T`` (+ ``scaling * B (S(A x) * A x)`` with an adapter).

    ``scale``: int8 weights' per-row scale; ``kernel``: ``stream`` (the streaming kernel), ``amx`` (the AMX
    kernel on ``packed``, :meth:`Linear.packed_weight`, which ``layer`` refreshes) or ``aten`` (ATen's product);
    ``lora_kernel``: ``stream`` or ``aten``, the products of ``lora_A`` and ``lora_B``; ``gate``: ``None``,
    ``"temporal"`` (its membrane carried along the tokens) or ``"pointwise"`` (from rest at every token), with
    ``gate_settings`` ``(tau, v_threshold, v_reset)``.
    """

    weight: torch.Tensor
    scale: torch.Tensor | None
    kernel: str
    packed: torch.Tensor | None = None
    layer: Linear | None = None
    lora_A: torch.Tensor | None = None  # noqa: N815 - PEFT's name
    lora_B: torch.Tensor | None = None  # noqa: N815 - PEFT's name
    lora_kernel: str = "aten"
    scaling: float = 0.0
    gate: str | None = None
    gate_settings: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class BlockOperands:
    """What :func:`decode_blocks` needs of one block: its tensors, its linear layers, its LIFs' settings."""

    tensors: tuple[torch.Tensor | None, ...]
    products: tuple[ProductOperands, ...]
    lif_settings: tuple[float, ...]
    eps: float


def unhooked(module: nn.Module, kind: type) -> bool:
    """Whether ``module`` is exactly a ``kind`` and has no forward hooks, so running its math directly changes nothing.

    A subclass may override ``forward`` and a hook (a spike monitor, the energy account's counters) must see
    the call, so either sends the caller back to the modules. Reads ``nn.Module``'s hook dictionaries, which
    torch has no public accessor for.
    """
    return type(module) is kind and not module._forward_hooks and not module._forward_pre_hooks


def linear_operands(layer: nn.Module, dtype: torch.dtype, rows: int) -> ProductOperands | None:
    """A bias-free :class:`Linear` or :class:`Int8Linear` as it multiplies ``rows`` rows of ``dtype``, else ``None``."""
    if unhooked(layer, Int8Linear) and layer.bias is None:
        return ProductOperands(layer.weight_int8, layer.scale, "stream")
    if unhooked(layer, Linear) and layer.bias is None and layer.weight.dtype == dtype:
        kernel = compiled_product(rows, dtype, dtype) or "aten"
        if kernel == "amx":
            return ProductOperands(layer.weight, None, kernel, layer.packed_weight(), layer)
        return ProductOperands(layer.weight, None, kernel)
    return None


def block_operands(
    block: nn.Module,
    dtype: torch.dtype,
    rows: int,
    product: Callable[[nn.Module, torch.dtype, int], ProductOperands | None] = linear_operands,
) -> BlockOperands | None:
    """The operands of ``block`` for :func:`decode_blocks` on ``rows`` sequences of ``dtype``, or ``None``.

    ``product`` describes each linear layer (default: plain layers only). ``None`` where the block is not built
    of exactly the modules the kernel implements (see the module docstring). The tensors are the block's own,
    not copies: weights changed in place are seen (the AMX layout of a weight, a copy, is taken from its
    layer by :func:`decode_blocks` at every call, made again where the weight has changed).
    """
    tensors: list[torch.Tensor | None] = []
    eps = set()
    for name in LAYER_NORMS:
        ln = getattr(block, name)
        if ln is None and name == "ln0":
            tensors += [None, None]
            continue
        if not (unhooked(ln, nn.LayerNorm) and ln.weight is not None and ln.bias is not None):
            return None
        if ln.weight.dtype != dtype or ln.bias.dtype != dtype:
            return None
        tensors += [ln.weight, ln.bias]
        eps.add(ln.eps)
    for path in MIX_TENSORS:
        tensor = block.get_parameter(path)
        if path.rsplit(".", 1)[1].startswith("time_mix"):
            if tensor.dtype != dtype or not tensor.is_contiguous():
                return None
            tensor = tensor.view(-1)  # [C], as the kernel mixes one token: a view, which sees changes in place
        tensors.append(tensor)
    products = tuple(product(block.get_submodule(path), dtype, rows) for path in PRODUCTS)
    if any(p is None for p in products):
        return None
    for p in products:
        tensors += [p.weight, p.scale, p.packed, p.lora_A, p.lora_B]
    lif_settings: list[float] = []
    for name in NEURONS:
        node = getattr(block, name)
        settings = node.kernel_settings() if unhooked(node, CompiledLIFNode) and node.step_mode == "m" else None
        if settings is None:
            return None
        lif_settings += settings
    if len(eps) != 1:
        return None
    return BlockOperands(tuple(tensors), products, tuple(lif_settings), eps.pop())


@dataclass(frozen=True)
class StackOperands:
    """The operands of a stack of blocks laid out as the kernel reads them, flattened once (:func:`stack_operands`)."""

    blocks: int
    tensors: list[torch.Tensor | None]
    kernels: list[int]
    lora_kernels: list[int]
    gates: list[int]
    scalars: list[float]
    lif_settings: list[float]
    eps: float
    #: Where in ``tensors`` an AMX layout goes, and the layer that makes it (:meth:`Linear.packed_weight`).
    packed: list[tuple[int, Linear]]


def stack_operands(blocks: list[BlockOperands]) -> StackOperands:
    """Lay out ``blocks`` for :func:`decode_blocks`; every LayerNorm of the stack must share one ``eps``."""
    if len({b.eps for b in blocks}) > 1:
        raise ValueError("decode_blocks: every LayerNorm of the stack must have the same eps")
    products = [p for b in blocks for p in b.products]
    packed, offset = [], 0
    for b in blocks:
        for p in b.products:
            if p.layer is not None:
                packed.append((offset + next(i for i, t in enumerate(b.tensors) if t is p.packed), p.layer))
        offset += len(b.tensors)
    return StackOperands(
        blocks=len(blocks),
        tensors=[t for b in blocks for t in b.tensors],
        kernels=[KERNELS[p.kernel] for p in products],
        lora_kernels=[KERNELS[p.lora_kernel] for p in products],
        gates=[GATES[p.gate] for p in products],
        scalars=[v for p in products for v in (p.scaling, *p.gate_settings)],
        lif_settings=[v for b in blocks for v in b.lif_settings],
        eps=blocks[0].eps if blocks else 1e-5,
        packed=packed,
    )


def decode_blocks(
    x: torch.Tensor,
    stack: StackOperands,
    att_shift: torch.Tensor,
    ffn_shift: torch.Tensor,
    wkv_state: torch.Tensor,
    membranes: list[torch.Tensor | None],
    record: bool = False,
    into: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor | None], list[torch.Tensor | None]
]:
    """One token per sequence through the blocks of ``stack``: ``x`` ``[B, C]`` after the embedding, their state.

    ``att_shift``/``ffn_shift`` ``[L, B, C]`` and ``wkv_state`` ``[L, B, 3, C]`` are float32. ``membranes``
    holds, per block, the membrane ``[B, width]`` (``None``: at rest) of each product's gate in
    :data:`PRODUCTS` order (``None`` where no temporal gate) and of ``lif1`` and ``lif2``. Returns ``x`` after
    the last block, the next shifts and WKV state, the membranes after the token in the same layout (``None``
    where nothing is carried; new tensors, the inputs are not changed) and, with ``record``, each product's
    gated down-projection ``S(A x) * A x`` ``[B, r]`` (``None`` without gate). ``into``: tensors like
    ``att_shift``, ``ffn_shift`` and ``wkv_state`` (contiguous, sharing no memory with the state) that receive
    the next ones and are returned, sparing a decoding loop fresh memory at every step. CPU only, without
    gradients.
    """
    tensors = stack.tensors
    if stack.packed:  # each AMX layout as its layer has it now: made again where the weight has changed
        tensors = list(tensors)
        for index, layer in stack.packed:
            tensors[index] = layer.packed_weight()
    out = extension().decode_blocks(
        x,
        tensors,
        stack.kernels,
        stack.lora_kernels,
        stack.gates,
        stack.scalars,
        att_shift,
        ffn_shift,
        wkv_state,
        membranes,
        stack.lif_settings,
        stack.eps,
        record,
        list(into or ()),
    )
    n_membranes = stack.blocks * (len(PRODUCTS) + len(NEURONS))
    return out[0], out[1], out[2], out[3], list(out[4 : 4 + n_membranes]), list(out[4 + n_membranes :])
