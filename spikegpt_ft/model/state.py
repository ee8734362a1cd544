"""The recurrent state that lets SpikeGPT run one token at a time.

Per layer: the last LayerNorm outputs entering the two mixers (token shift), the WKV state
``(a, b, p)`` and the membrane of every LIF neuron after the last token. Membranes are keyed by
module name, so spiking neurons added later (SpikeLoRA gates) ride along without the model
knowing about them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RecurrentState:
    """Everything a SpikeGPT needs to continue a batch of sequences after their last token.

    ``att_shift``/``ffn_shift`` are ``[L, B, C]``, ``wkv`` is ``[L, B, 3, C]`` (all float32);
    ``membranes`` maps each LIF module name to its membrane ``[B, width]``, or ``None`` while the
    neuron has seen no token (a membrane of 0). ``signature`` names the model it belongs to.
    """

    att_shift: torch.Tensor
    ffn_shift: torch.Tensor
    wkv: torch.Tensor
    membranes: dict[str, torch.Tensor | None] = field(default_factory=dict)
    signature: tuple = ()

    @property
    def batch_size(self) -> int:
        """Number of sequences carried."""
        return self.att_shift.shape[1]

    def select(self, index: torch.Tensor | slice | list[int]) -> RecurrentState:
        """The state of a subset of the batch (for dropping finished sequences)."""
        return RecurrentState(
            att_shift=self.att_shift[:, index],
            ffn_shift=self.ffn_shift[:, index],
            wkv=self.wkv[:, index],
            membranes={k: None if v is None else v[index] for k, v in self.membranes.items()},
            signature=self.signature,
        )

    def nbytes(self) -> int:
        """Memory held by the state, in bytes."""
        tensors = [self.att_shift, self.ffn_shift, self.wkv, *(v for v in self.membranes.values() if v is not None)]
        return sum(t.numel() * t.element_size() for t in tensors)
