"""The adapted linear layer: a frozen base plus a LoRA or SpikeLoRA update.

LoRA (Hu et al., 2021) adds a low-rank update to a frozen linear layer ``W0``::

    h = W0 x + s * B (A x)                         A: [r, k], B: [d, r]

SpikeLoRA (de Jong, Bosman, Schreuder, 2025) gates the down-projection's activations with a leaky
integrate-and-fire neuron per rank channel::

    h = W0 x + s * B (S(A x) * A x)                S(A x) in {0, 1}^r, the LIF's spikes

The gate is SpikingJelly's LIF (tau, ``decay_input``, hard reset to 0, arctangent surrogate). With
``gate="temporal"`` it is a multi-step neuron running along the tokens, its membrane carried by the
model's recurrent state; with ``gate="pointwise"`` it is a single-step neuron reset before every call, so
each token's channel fires iff ``(A x) / tau >= V_th`` and nothing is carried (the SpikeLoRA authors'
released code). ``A`` starts Kaiming-uniform and ``B`` at zero, so a freshly adapted model computes exactly
what the base model does. The attribute names ``base``, ``lora_A``, ``lora_B`` and ``scaling`` are PEFT's.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from spikingjelly.activation_based import neuron, surrogate
from torch import nn

from ..model import fire, make_lif
from ..ops import CompiledLIFNode
from ..ops.decode import ProductOperands, linear_operands, unhooked
from ..ops.lif import lif_kernel_settings
from ..ops.linear import streams_unpacked, unpacked_linear
from . import sparsity
from .config import AdapterConfig


def make_gate(config: AdapterConfig) -> neuron.LIFNode | None:
    """The gate neuron of an adapter of ``config`` (``None`` for LoRA)."""
    if not config.gated:
        return None
    if config.gate == "temporal":
        return make_lif(config.v_threshold, config.tau)
    return neuron.LIFNode(
        tau=config.tau,
        v_threshold=config.v_threshold,
        v_reset=0.0,
        decay_input=True,
        detach_reset=False,
        surrogate_function=surrogate.ATan(alpha=2.0),
        step_mode="s",
    )


class AdapterLinear(nn.Module):
    """A frozen linear layer (``self.base``) plus a LoRA or SpikeLoRA update; takes ``[B, T, k]``."""

    def __init__(self, base: nn.Linear, config: AdapterConfig):
        super().__init__()
        self.base = base
        self.kind = config.kind
        self.r = config.rank
        self.scaling = config.scaling
        self.gate_mode = config.gate if config.gated else None
        w = base.weight
        a = torch.empty(config.rank, base.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # what nn.Linear does to its weight
        self.lora_A = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, config.rank, device=w.device, dtype=w.dtype))
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.gate = make_gate(config)
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """``s * B A`` in float32 (the LoRA update as a ``[d, k]`` matrix)."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def gated(self, a: torch.Tensor) -> torch.Tensor:
        """``S(a) * a`` for the down-projection ``a`` ``[B, T, r]``; the gate's spikes in ``a``'s dtype."""
        if self.gate_mode == "temporal":
            return fire(self.gate, a) * a
        self.gate.reset()
        try:
            spikes = self.gate(a.float()).to(a.dtype)
        finally:
            self.gate.reset()
        return spikes * a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        if x.dim() != 3:
            raise ValueError(f"adapters take input of shape [B, T, features], got {tuple(x.shape)}")
        # bfloat16 inference on the CPU: the streaming kernel, as the compiled step multiplies them
        a = unpacked_linear(self.dropout(x), self.lora_A.to(x.dtype))
        if self.gate is not None:
            a = self.gated(a)
            sparsity.record(self, a)
        return out + unpacked_linear(a, self.lora_B.to(x.dtype)) * self.scaling

    def decode_operands(self, dtype: torch.dtype, rows: int) -> ProductOperands | None:
        """This layer as the compiled CPU step multiplies ``rows`` rows of ``dtype`` (:mod:`spikegpt_ft.ops.decode`).

        ``None`` where that step would compute something else than :meth:`forward`: in training mode (dropout),
        with hooks, or with a base or gate the kernels do not implement.
        """
        base = linear_operands(self.base, dtype, rows)
        if base is None or not unhooked(self, AdapterLinear) or self.training or self.dropout.training:
            return None
        if not unhooked(self.dropout, type(self.dropout)):
            return None
        if self.merged:
            return base
        gate, settings = self.gate, (0.0, 0.0, 0.0)
        if gate is not None:
            kind, mode = (CompiledLIFNode, "m") if self.gate_mode == "temporal" else (neuron.LIFNode, "s")
            found = lif_kernel_settings(gate) if unhooked(gate, kind) and gate.step_mode == mode else None
            if found is None:
                return None
            settings = found
        # the products of A and B as forward's unpacked_linear multiplies `rows` rows of `dtype` without gradients
        streamed = streams_unpacked(rows, dtype, dtype)
        return dataclasses.replace(
            base,
            lora_A=self.lora_A,
            lora_B=self.lora_B,
            lora_kernel="stream" if streamed else "aten",
            scaling=float(self.scaling),
            gate=self.gate_mode,
            gate_settings=settings,
        )

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the LoRA update into the base weight (outputs unchanged up to rounding); not for SpikeLoRA."""
        if self.gate is not None:
            raise ValueError("SpikeLoRA adapters cannot be merged: the spiking gate depends on the input")
        if not self.merged:
            w = self.base.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to rounding in the weight's dtype)."""
        if self.merged:
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        gate = f", gate={self.gate_mode}" if self.gate_mode else ""
        return f"kind={self.kind}, r={self.r}, scaling={self.scaling:.4g}{gate}, merged={self.merged}"
