"""SpikeGPT (Zhu et al., 2024): RWKV-v4 style blocks whose mixer outputs pass through LIF neurons.

The arithmetic follows ``docs/spikegpt-model.md`` of the shared folder::

    x = H(E[ids])                                  binary embedding, arctangent surrogate
    for each block:
        x = x + LIF1(TimeMix(LN1(x)))              LIF along the token axis
        x = x + LIF2(ChannelMix(LN2(x)))
        x = dropout(x, 0.03)                       training only
    logits = Head(LN_out(x))

One code path serves every mode: ``forward`` is a fresh parallel pass, ``prefill`` a parallel pass
that continues from a :class:`RecurrentState` and returns the next one, and ``step`` is ``prefill`` of
one token. Parameter names are the official ones, so official checkpoints load as they are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from spikingjelly.activation_based import neuron, surrogate
from torch import nn

from ..ops import CompiledLIFNode, Linear, fresh_state, wkv
from .state import RecurrentState

#: Dropout after every block while training (the official setting).
BLOCK_DROPOUT = 0.03
#: The vocabulary of the GPT-NeoX-20B tokenizer as SpikeGPT uses it (SpikeGPT-216M's embedding rows).
VOCAB_SIZE = 50277


def make_lif(v_threshold: float = 1.0, tau: float = 2.0) -> CompiledLIFNode:
    """A multi-step SpikingJelly LIF neuron with SpikeGPT's settings (hard reset to 0, ATan surrogate).

    It is SpikingJelly's ``LIFNode`` with a compiled CPU path (see :mod:`spikegpt_ft.ops.lif`).
    """
    return CompiledLIFNode(
        tau=tau,
        v_threshold=v_threshold,
        v_reset=0.0,
        decay_input=True,
        detach_reset=False,
        surrogate_function=surrogate.ATan(alpha=2.0),
        step_mode="m",
    )


def fire(node: neuron.LIFNode, x: torch.Tensor) -> torch.Tensor:
    """Run ``x`` ``[B, T, C]`` through a multi-step LIF along the token axis; spikes in ``x``'s dtype.

    The neuron integrates in float32 whatever the model's dtype; its membrane after the last token
    stays in ``node.v`` for the caller to carry. It is called as a module so that forward hooks
    (spike-rate monitors) see it.
    """
    spikes = node(x.float().transpose(0, 1).contiguous())
    return spikes.transpose(0, 1).to(x.dtype)


def shift_mix(y: torch.Tensor, previous: torch.Tensor, *mus: torch.Tensor) -> list[torch.Tensor]:
    """``y * mu + shift(y) * (1 - mu)`` for each ``mu``: a mixer's token-shifted inputs.

    ``shift(y)`` is ``y`` one token later along T, with ``previous`` ``[B, C]`` entering at position 0.
    """
    previous = previous.to(y.dtype).unsqueeze(1)
    shifted = previous if y.shape[1] == 1 else torch.cat([previous, y[:, :-1]], dim=1)
    delta = y - shifted
    return [torch.addcmul(shifted, mu, delta) for mu in mus]


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """Raise a ``ValueError`` naming the first bad id if any of ``ids`` is outside ``[0, vocab_size)``.

    Reads the ids' bounds on the host: free for CPU tensors, one sync for GPU ones.
    """
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()
    if lo < 0 or hi >= vocab_size:
        bad = hi if hi >= vocab_size else lo
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")


@dataclass(frozen=True)
class SpikeGPTConfig:
    """Sizes of a SpikeGPT, all readable from a state dict."""

    vocab_size: int
    n_embd: int
    n_layer: int
    ffn_hidden: int
    head_out: int
    head_bias: bool = False

    @classmethod
    def sized(
        cls,
        n_layer: int,
        n_embd: int,
        vocab_size: int = VOCAB_SIZE,
        ffn_hidden: int | None = None,
        head_out: int | None = None,
    ) -> SpikeGPTConfig:
        """A language model's config from its sizes: FFN ``4 * n_embd`` and an LM head unless given."""
        return cls(vocab_size, n_embd, n_layer, ffn_hidden or 4 * n_embd, head_out or vocab_size)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> SpikeGPTConfig:
        """Infer the config from tensor shapes, as the official checkpoints carry no config."""
        vocab, n_embd = sd["emb.weight"].shape
        layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
        return cls(
            vocab_size=vocab,
            n_embd=n_embd,
            n_layer=1 + max(layers) if layers else 0,
            ffn_hidden=sd["blocks.0.ffn.key.weight"].shape[0] if layers else 4 * n_embd,
            head_out=sd["head.weight"].shape[0],
            head_bias="head.bias" in sd,
        )


class TimeMix(nn.Module):
    """The spiking RWKV (SRWKV) token mixer."""

    def __init__(self, n_embd: int):
        super().__init__()
        self.time_decay = nn.Parameter(torch.zeros(n_embd))
        self.time_first = nn.Parameter(torch.zeros(n_embd))
        self.time_mix_k = nn.Parameter(torch.full((1, 1, n_embd), 0.5))
        self.time_mix_v = nn.Parameter(torch.full((1, 1, n_embd), 0.5))
        self.time_mix_r = nn.Parameter(torch.full((1, 1, n_embd), 0.5))
        self.key = Linear(n_embd, n_embd, bias=False)
        self.value = Linear(n_embd, n_embd, bias=False)
        self.receptance = Linear(n_embd, n_embd, bias=False)
        self.output = Linear(n_embd, n_embd, bias=False)

    def forward(
        self, y: torch.Tensor, previous: torch.Tensor, wkv_state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix ``y`` ``[B, T, C]`` given the token before it and the WKV state; returns the new WKV state too."""
        mixed_k, mixed_v, mixed_r = shift_mix(y, previous, self.time_mix_k, self.time_mix_v, self.time_mix_r)
        k, v, r = self.key(mixed_k), self.value(mixed_v), self.receptance(mixed_r)
        gated, wkv_state = wkv(self.time_decay, self.time_first, k, v, wkv_state, receptance=r)  # sigmoid(r) * wkv
        return self.output(gated), wkv_state


class ChannelMix(nn.Module):
    """The spiking receptance feed-forward network (SRFFN)."""

    def __init__(self, n_embd: int, hidden: int):
        super().__init__()
        self.time_mix_k = nn.Parameter(torch.full((1, 1, n_embd), 0.5))
        self.time_mix_r = nn.Parameter(torch.full((1, 1, n_embd), 0.5))
        self.key = Linear(n_embd, hidden, bias=False)
        self.receptance = Linear(n_embd, n_embd, bias=False)
        self.value = Linear(hidden, n_embd, bias=False)

    def forward(self, y: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Mix ``y`` ``[B, T, C]`` given the token before it."""
        mixed_k, mixed_r = shift_mix(y, previous, self.time_mix_k, self.time_mix_r)
        k = torch.square(torch.relu(self.key(mixed_k)))
        return torch.sigmoid(self.receptance(mixed_r)) * self.value(k)


class Block(nn.Module):
    """One SpikeGPT layer: time mix and channel mix, each followed by a LIF layer on the residual."""

    def __init__(self, index: int, n_embd: int, ffn_hidden: int):
        super().__init__()
        self.ln0 = nn.LayerNorm(n_embd) if index == 0 else None
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)
        self.att = TimeMix(n_embd)
        self.ffn = ChannelMix(n_embd, ffn_hidden)
        self.lif1 = make_lif()
        self.lif2 = make_lif()
        self.drop = nn.Dropout(BLOCK_DROPOUT)

    def forward(
        self, x: torch.Tensor, att_shift: torch.Tensor, ffn_shift: torch.Tensor, wkv_state: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Advance the residual stream ``x`` ``[B, T, C]``; returns it and this layer's carried state."""
        if self.ln0 is not None:
            x = self.ln0(x)
        y = self.ln1(x)
        mixed, wkv_state = self.att(y, att_shift, wkv_state)
        x = x + fire(self.lif1, mixed)
        z = self.ln2(x)
        x = x + fire(self.lif2, self.ffn(z, ffn_shift))
        return self.drop(x), (y[:, -1], z[:, -1], wkv_state)


class SpikeGPT(nn.Module):
    """The SpikeGPT language model (or classifier, once :meth:`reset_head` gave it a class head)."""

    def __init__(self, config: SpikeGPTConfig):
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.binarize = surrogate.ATan(alpha=2.0)
        self.blocks = nn.ModuleList(Block(i, config.n_embd, config.ffn_hidden) for i in range(config.n_layer))
        self.ln_out = nn.LayerNorm(config.n_embd)
        self.head = Linear(config.n_embd, config.head_out, bias=config.head_bias)

    def reset_head(self, n_out: int, bias: bool = True) -> None:
        """Replace the head by a fresh ``C -> n_out`` one, PyTorch's default init (a classification head)."""
        p = self.emb.weight
        self.head = Linear(self.config.n_embd, n_out, bias=bias, device=p.device, dtype=p.dtype)
        self.config = SpikeGPTConfig(**{**self.config.__dict__, "head_out": n_out, "head_bias": bias})

    def spiking_neurons(self) -> dict[str, neuron.BaseNode]:
        """Every SpikingJelly neuron layer in the model, adapters' gates included, by module name."""
        return {name: m for name, m in self.named_modules() if isinstance(m, neuron.BaseNode)}

    def carried_neurons(self) -> dict[str, neuron.BaseNode]:
        """The neurons whose membrane runs along the tokens (multi-step): the recurrent state carries them.

        A single-step neuron (SpikeLoRA's pointwise gate) starts from rest at every token and carries nothing.
        """
        return {name: m for name, m in self.spiking_neurons().items() if m.step_mode == "m"}

    def state_signature(self, nodes: Mapping[str, neuron.BaseNode] | None = None) -> tuple:
        """What a state must match to continue this model: sizes and the names of its carried neurons."""
        return (self.config.n_layer, self.config.n_embd, tuple(self.carried_neurons() if nodes is None else nodes))

    def init_state(self, batch_size: int) -> RecurrentState:
        """The state of ``batch_size`` sequences before any token."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        L, C, device = self.config.n_layer, self.config.n_embd, self.emb.weight.device
        nodes = self.carried_neurons()
        return RecurrentState(
            att_shift=torch.zeros(L, batch_size, C, device=device),
            ffn_shift=torch.zeros(L, batch_size, C, device=device),
            wkv=fresh_state(L * batch_size, C, device).view(L, batch_size, 3, C),
            membranes=dict.fromkeys(nodes),
            signature=self.state_signature(nodes),
        )

    # ``check_ids=False`` skips the range check of the token ids, which on a GPU costs a host-device
    # sync; for callers that checked their ids already (the training loop checks each batch on the host,
    # before it is copied) and for CUDA-graph capture, where a sync is not allowed.

    def forward(self, ids: torch.Tensor, *, check_ids: bool = True) -> torch.Tensor:
        """Logits ``[B, T, head_out]`` for token ids ``[B, T]`` from a fresh state (parallel mode)."""
        return self._run(ids, None, check_ids)[0]

    def prefill(
        self, ids: torch.Tensor, state: RecurrentState, *, check_ids: bool = True
    ) -> tuple[torch.Tensor, RecurrentState]:
        """Parallel pass over ``ids`` ``[B, T]`` continuing from ``state``; returns logits and the next state."""
        return self._run(ids, state, check_ids)

    def step(
        self, tokens: torch.Tensor, state: RecurrentState, *, check_ids: bool = True
    ) -> tuple[torch.Tensor, RecurrentState]:
        """One token per sequence (``tokens`` ``[B]``); returns logits ``[B, head_out]`` and the next state."""
        if tokens.dim() != 1:
            raise ValueError(f"step takes one token per sequence, shape [B]; got shape {tuple(tokens.shape)}")
        logits, state = self._run(tokens.unsqueeze(1), state, check_ids)
        return logits[:, 0], state

    def _check(
        self, ids: torch.Tensor, state: RecurrentState | None, nodes: Mapping[str, neuron.BaseNode], check_ids: bool
    ) -> None:
        if ids.dim() != 2:
            raise ValueError(f"token ids must have shape [B, T], got {tuple(ids.shape)}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"token ids must be integers (int64), got {ids.dtype}")
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"empty input: token ids of shape {tuple(ids.shape)}; give at least one token")
        if check_ids:
            check_token_ids(ids, self.config.vocab_size)
        if state is None:
            return
        if not isinstance(state, RecurrentState):
            raise ValueError(f"state must be a RecurrentState from init_state/prefill/step, got {type(state).__name__}")
        if state.signature != self.state_signature(nodes):
            raise ValueError(
                "this state belongs to another model (layers, width or spiking neurons differ): "
                f"state {state.signature[:2]} vs model {self.state_signature()[:2]}; start from model.init_state()"
            )
        if state.batch_size != ids.shape[0]:
            raise ValueError(f"state holds {state.batch_size} sequences but {ids.shape[0]} were given")

    def _run(
        self, ids: torch.Tensor, state: RecurrentState | None, check_ids: bool
    ) -> tuple[torch.Tensor, RecurrentState]:
        nodes = self.carried_neurons()
        self._check(ids, state, nodes, check_ids)
        state = state or self.init_state(ids.shape[0])
        for name, node in nodes.items():
            if state.membranes[name] is None:
                node.reset()
            else:
                node.v = state.membranes[name]
        try:
            x = self.binarize(self.emb(ids))
            carried = []
            for i, block in enumerate(self.blocks):
                x, layer_state = block(x, state.att_shift[i], state.ffn_shift[i], state.wkv[i])
                carried.append(layer_state)
            logits = self.head(self.ln_out(x))
            membranes = {name: node.v.detach() for name, node in nodes.items()}
        finally:
            for node in nodes.values():
                node.reset()
        att_shift, ffn_shift, wkv_state = (torch.stack([c[j].detach().float() for c in carried]) for j in range(3))
        next_state = RecurrentState(att_shift, ffn_shift, wkv_state, membranes, state.signature)
        return logits, next_state
