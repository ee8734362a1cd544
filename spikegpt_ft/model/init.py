"""Sizes and initialisations of SpikeGPT models that do not come from a checkpoint.

- :data:`PRESETS`: named sizes (``--model NAME`` for ``--base scratch``); a YAML file with ``n_layer`` and
  ``n_embd`` (optional ``ffn_hidden``, ``vocab_size``, ``name``) gives any other size.
- :func:`init_scratch`: the initialisations a model trained from scratch can start from (:data:`SCRATCH_INITS`).
- :func:`init_random_spiking`: random weights scaled so that the LIFs fire, for tests, benchmarks and the
  energy account's rate measurements on untrained models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .spikegpt import VOCAB_SIZE, SpikeGPT, SpikeGPTConfig


@dataclass(frozen=True)
class Preset:
    """A model size: layers, width, FFN width and vocabulary."""

    name: str
    n_layer: int
    n_embd: int
    ffn_hidden: int | None = None
    vocab_size: int = VOCAB_SIZE

    def config(self) -> SpikeGPTConfig:
        """The language model's config at this size (LM head)."""
        return SpikeGPTConfig.sized(self.n_layer, self.n_embd, self.vocab_size, self.ffn_hidden)


#: Named sizes. ``nlu-12x512`` and ``nlu-24x768`` are the official SpikeGPT NLU scripts' scratch models
#: (Subj and SST-5; MR and SST-2), ``216m`` is SpikeGPT-216M.
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny", 2, 64),
        Preset("small", 4, 256),
        Preset("nlu-12x512", 12, 512),
        Preset("nlu-24x768", 24, 768),
        Preset("216m", 18, 768),
    )
}


def read_preset(name_or_path: str | Path) -> Preset:
    """A preset by name (:data:`PRESETS`) or from a YAML file; anything else is an error listing the names."""
    key = str(name_or_path)
    if key in PRESETS:
        return PRESETS[key]
    path = Path(key)
    if not path.is_file():
        raise FileNotFoundError(
            f"model size {key!r} is neither a preset ({', '.join(PRESETS)}) nor a YAML file with n_layer and n_embd"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"model size file {path} is not readable YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"model size file {path} must hold a mapping with n_layer and n_embd")
    for key_ in ("n_layer", "n_embd"):
        value = data.get(key_)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model size file {path}: {key_} must be a positive integer, got {value!r}")
    return Preset(
        name=str(data.get("name") or path.stem),
        n_layer=data["n_layer"],
        n_embd=data["n_embd"],
        ffn_hidden=int(data["ffn_hidden"]) if data.get("ffn_hidden") else None,
        vocab_size=int(data.get("vocab_size") or VOCAB_SIZE),
    )


#: The initialisations of a scratch model's matrices and embedding (``--init``):
#: ``rwkv``: RWKV-v4's ``RWKV_Init``, which the official SpikeGPT ``src/model.py`` applies to a fresh model: a
#: tiny embedding (orthogonal, gain 1e-4 sqrt(max(V, C))), orthogonal matrices with gain sqrt(out / in) where
#: out > in, the LM head at half that gain, and zeros for the attention's key, receptance and output and the
#: FFN's receptance and value; ``pytorch``: PyTorch's defaults (N(0, 1) embedding, Kaiming-uniform matrices);
#: ``wide``: N(0, 1) embedding and every matrix N(0, (2 / sqrt(fan_in))^2), as :func:`init_random_spiking`.
SCRATCH_INITS = ("rwkv", "pytorch", "wide")
#: The matrices ``RWKV_Init`` starts at zero (``scale_init = 0`` in the official ``src/model.py``).
_RWKV_ZERO = ("att.key", "att.receptance", "att.output", "ffn.receptance", "ffn.value")


@torch.no_grad()
def init_scratch(model: SpikeGPT, scheme: str = "rwkv") -> SpikeGPT:
    """Initialise a fresh SpikeGPT: RWKV-v4's per-channel decay and mix ramps, then ``scheme``'s matrices.

    ``scheme`` is one of :data:`SCRATCH_INITS`. Uses the global torch RNG, so ``lightning.seed_everything``
    fixes the result.
    """
    if scheme not in SCRATCH_INITS:
        raise ValueError(f"scratch initialisation must be one of {SCRATCH_INITS}, got {scheme!r}")
    n_layer, C = model.config.n_layer, model.config.n_embd
    ramp = torch.arange(C, dtype=torch.float32) / max(C - 1, 1)
    x = (torch.arange(C, dtype=torch.float32) / C).view(1, 1, C)
    zigzag = torch.tensor([(j + 1) % 3 - 1 for j in range(C)], dtype=torch.float32) * 0.5
    for i, block in enumerate(model.blocks):
        r01 = i / max(n_layer - 1, 1)  # 0 -> 1 over the layers
        r1_0 = 1.0 - i / n_layer  # 1 -> ~0
        att, ffn = block.att, block.ffn
        att.time_decay.copy_(-5 + 8 * ramp ** (0.7 + 1.3 * r01))
        att.time_first.copy_(math.log(0.3) + zigzag)
        att.time_mix_k.copy_(x**r1_0)
        att.time_mix_v.copy_(x**r1_0 + 0.3 * r01)
        att.time_mix_r.copy_(x ** (0.5 * r1_0))
        ffn.time_mix_k.copy_(x**r1_0)
        ffn.time_mix_r.copy_(x**r1_0)
    matrices = {
        f"blocks.{i}.{name}": block.get_submodule(name)
        for i, block in enumerate(model.blocks)
        for name in ("att.key", "att.value", "att.receptance", "att.output", "ffn.key", "ffn.receptance", "ffn.value")
    }
    if scheme == "rwkv":
        emb = model.emb.weight
        torch.nn.init.orthogonal_(emb, gain=1e-4 * math.sqrt(max(emb.shape)))
        for name, lin in {**matrices, "head": model.head}.items():
            out_features, in_features = lin.weight.shape
            gain = math.sqrt(out_features / in_features) if out_features > in_features else 1.0
            if name.endswith(_RWKV_ZERO):
                torch.nn.init.zeros_(lin.weight)
            else:
                torch.nn.init.orthogonal_(lin.weight, gain=gain * (0.5 if name == "head" else 1.0))
    elif scheme == "pytorch":
        torch.nn.init.normal_(model.emb.weight)
        for lin in (*matrices.values(), model.head):
            lin.reset_parameters()
    else:
        torch.nn.init.normal_(model.emb.weight)
        for lin in matrices.values():
            torch.nn.init.normal_(lin.weight, 0.0, 2.0 / lin.weight.shape[1] ** 0.5)
    return model


@torch.no_grad()
def init_random_spiking(model: SpikeGPT, seed: int = 0) -> SpikeGPT:
    """Random weights scaled so that the LIFs fire (PyTorch's default init leaves them almost silent).

    Matrices ~ N(0, (2 / sqrt(fan_in))^2), ``time_decay`` ~ U(-3, 1), ``time_first`` ~ U(-1, 1), the
    ``time_mix`` ~ U(0, 1); drawn from a generator seeded with ``seed``. Rates measured on such a model
    describe a random network, not a trained one.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("time_decay"):
            p.copy_(torch.rand(p.shape, generator=g) * 4 - 3)
        elif name.endswith("time_first"):
            p.copy_(torch.rand(p.shape, generator=g) * 2 - 1)
        elif "time_mix" in name:
            p.copy_(torch.rand(p.shape, generator=g))
        elif p.dim() == 2:
            p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p.shape[1] ** 0.5))
    return model
