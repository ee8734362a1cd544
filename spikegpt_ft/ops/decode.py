"""One recurrent step through a stack of SpikeGPT blocks in a single compiled call (CPU decoding).

At batch 1 a step of SpikeGPT is some 25 tiny operations per block, and from Python each costs microseconds
of interpreter and module dispatch: at 18 layers that is milliseconds per token, whatever the width
(BENCHMARKS.md, "step overhead"). :func:`decode_blocks` runs the blocks' operations from C++
(``csrc/decode_cpu.cpp``): the same ATen ops and the same WKV, LIF and product kernels, in the same dtypes
and order as the modules, so its results are bitwise those of ``model.step`` (the reference; the tests
compare the two).

It applies to blocks built as :class:`~spikegpt_ft.model.SpikeGPT` builds them: LayerNorms, the ops'
:class:`~spikegpt_ft.ops.Linear` or :class:`~spikegpt_ft.ops.Int8Linear` without bias, and
:class:`~spikegpt_ft.ops.CompiledLIFNode` with the kernel's settings, none with forward hooks.
:func:`block_operands` says whether a block is such a one and collects its tensors; an adapter, a hook
(a spike monitor) or another neuron makes it ``None``, and the caller then runs the modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .extension import extension
from .lif import CompiledLIFNode
from .linear import Int8Linear, Linear, streams

#: The parameters of a block in the kernel's order (``Slot`` in ``csrc/decode_cpu.cpp``), before the products.
MIX_TENSORS = (
    ("att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "att.time_decay", "att.time_first"),
    ("ffn.time_mix_k", "ffn.time_mix_r"),
)
#: The block's linear layers, in the kernel's order: the time mix's four, then the channel mix's three.
PRODUCTS = (
    ("att.key", "att.value", "att.receptance", "att.output"),
    ("ffn.key", "ffn.receptance", "ffn.value"),
)
#: The block's LayerNorms (``ln0`` only in block 0) and its two LIF layers.
LAYER_NORMS = ("ln0", "ln1", "ln2")
NEURONS = ("lif1", "lif2")


@dataclass(frozen=True)
class BlockOperands:
    """What :func:`decode_blocks` needs of one block: its tensors, the product of each linear layer, its LIFs."""

    tensors: tuple[torch.Tensor | None, ...]
    stream: tuple[bool, ...]
    lif_settings: tuple[float, ...]
    eps: float


def unhooked(module: nn.Module, kind: type) -> bool:
    """Whether ``module`` is exactly a ``kind`` and has no forward hooks, so running its math directly changes nothing.

    A subclass may override ``forward`` and a hook (a spike monitor, the energy account's counters) must see
    the call, so either sends the caller back to the modules. Reads ``nn.Module``'s hook dictionaries, which
    torch has no public accessor for.
    """
    return type(module) is kind and not module._forward_hooks and not module._forward_pre_hooks


def _product(layer: nn.Module, dtype: torch.dtype, rows: int) -> tuple[torch.Tensor, torch.Tensor | None, bool] | None:
    """``(weight, scale or None, streams)`` of a bias-free linear layer as it multiplies ``rows`` rows of ``dtype``."""
    if unhooked(layer, Int8Linear) and layer.bias is None:
        return layer.weight_int8, layer.scale, True
    if unhooked(layer, Linear) and layer.bias is None and layer.weight.dtype == dtype:
        return layer.weight, None, streams(rows, dtype, dtype)
    return None


def block_operands(block: nn.Module, dtype: torch.dtype, rows: int) -> BlockOperands | None:
    """The operands of ``block`` for :func:`decode_blocks` on ``rows`` sequences of ``dtype``, or ``None``.

    ``None`` where the block is not built of exactly the modules the kernel implements (see the module
    docstring). The tensors are the block's own, not copies: weights changed in place are seen.
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
    stream: list[bool] = []
    for mixes, products in zip(MIX_TENSORS, PRODUCTS, strict=True):
        for path in mixes:
            tensor = block.get_parameter(path)
            if path.rsplit(".", 1)[1].startswith("time_mix") and tensor.dtype != dtype:
                return None
            tensors.append(tensor)
        for path in products:
            product = _product(block.get_submodule(path), dtype, rows)
            if product is None:
                return None
            tensors += product[:2]
            stream.append(product[2])
    lif_settings: list[float] = []
    for name in NEURONS:
        node = getattr(block, name)
        settings = node.kernel_settings() if unhooked(node, CompiledLIFNode) and node.step_mode == "m" else None
        if settings is None:
            return None
        lif_settings += settings
    if len(eps) != 1:
        return None
    return BlockOperands(tuple(tensors), tuple(stream), tuple(lif_settings), eps.pop())


def decode_blocks(
    x: torch.Tensor,
    blocks: list[BlockOperands],
    att_shift: torch.Tensor,
    ffn_shift: torch.Tensor,
    wkv_state: torch.Tensor,
    membranes: list[torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One token per sequence through the blocks: ``x`` ``[B, C]`` after the embedding, the state of all blocks.

    ``att_shift``/``ffn_shift`` ``[L, B, C]`` and ``wkv_state`` ``[L, B, 3, C]`` are float32;
    ``membranes`` holds the two LIFs' membranes ``[B, C]`` per block (``None``: at rest). Returns ``x`` after
    the last block and the next state: shifts, WKV state and the ``2 L`` membranes (new tensors; the inputs
    are not changed). CPU only, without gradients.
    """
    if len({b.eps for b in blocks}) > 1:
        raise ValueError("decode_blocks: every LayerNorm of the stack must have the same eps")
    out = extension().decode_blocks(
        x,
        [t for b in blocks for t in b.tensors],
        [s for b in blocks for s in b.stream],
        att_shift,
        ffn_shift,
        wkv_state,
        membranes,
        [v for b in blocks for v in b.lif_settings],
        blocks[0].eps if blocks else 1e-5,
    )
    return out[0], out[1], out[2], out[3], list(out[4:])
