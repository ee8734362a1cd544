"""LoRA and SpikeLoRA adapters for SpikeGPT.

LoRA (Hu et al., 2021) adds a low-rank update to a frozen linear layer ``W0``::

    h = W0 x + s * B (A x)                         A: [r, k], B: [d, r]

SpikeLoRA (de Jong, Bosman, Schreuder, 2025) gates the down-projection's activations with a leaky
integrate-and-fire neuron per rank channel, run along the token axis::

    h = W0 x + s * B (S(A x) * A x)                S(A x) in {0, 1}^r, the LIF's spikes

The scaling ``s`` is ``alpha / sqrt(r)`` (rsLoRA, the paper's default with ``alpha = sqrt(r)``, so
``s = 1``) or ``alpha / r`` (standard LoRA). ``A`` starts Kaiming-uniform and ``B`` at zero, so a
freshly adapted model computes exactly what the base model does.

Everything here works on a :class:`~spikegpt_ft.model.SpikeGPT` in place:

- :func:`attach_adapters` wraps the target ``nn.Linear`` layers in :class:`AdapterLinear`, freezes the
  base and leaves the head (``model.head``) trainable; the config is kept as ``model.adapter_config``.
- The gate is an ordinary SpikingJelly LIF node (``<module>.gate``), so ``SpikeGPT._run`` carries its
  membrane in the :class:`~spikegpt_ft.state.RecurrentState` like any other neuron: ``step`` and
  ``prefill`` give the same outputs as one parallel pass.
- :func:`sparsity` reports the fraction of zeros of ``S(A x) * A x`` per module, over the real tokens
  given by :func:`set_token_mask`, counted on the device without synchronising.
- :func:`merge_adapters` / :func:`unmerge_adapters` fold plain LoRA into the base weights.
- :func:`save_adapters` / :func:`load_adapters` write and read a small safetensors file holding only
  the adapter and head weights, their config and a fingerprint of the frozen base.

The base weight of an adapted layer is ``<module>.base.weight``; :func:`official_name` maps such a key
back to the official one (``blocks.0.att.key.base.weight`` -> ``blocks.0.att.key.weight``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .files import atomic_save_safetensors
from .model import SpikeGPT, SpikeGPTConfig, fire, make_lif

#: Kinds of adapter.
KINDS = ("lora", "spikelora")

#: Every linear layer inside the blocks (7 per block); the head is trained in full instead.
DEFAULT_TARGETS = (
    "att.key",
    "att.value",
    "att.receptance",
    "att.output",
    "ffn.key",
    "ffn.value",
    "ffn.receptance",
)

#: ``format`` entry of an adapter file's metadata.
FILE_FORMAT = "spikegpt-ft-adapters"
FILE_VERSION = "1"

_BASE_INFIX = ".base."


@dataclass(frozen=True)
class AdapterConfig:
    """How a model was adapted. ``alpha=None`` resolves to the paper's ``sqrt(r)`` (stored resolved)."""

    kind: str = "spikelora"
    r: int = 8
    alpha: float | None = None
    rslora: bool = True
    dropout: float = 0.0
    v_threshold: float = 0.1
    tau: float = 2.0
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"adapter kind must be one of {KINDS}, got {self.kind!r}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"adapter rank r must be an integer >= 1, got {self.r!r}")
        if self.alpha is None:
            object.__setattr__(self, "alpha", math.sqrt(self.r))
        if isinstance(self.alpha, bool) or not (
            isinstance(self.alpha, int | float) and math.isfinite(self.alpha) and self.alpha > 0
        ):
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter dropout must be in [0, 1), got {self.dropout!r}")
        if self.kind == "spikelora":
            if not (math.isfinite(self.v_threshold) and self.v_threshold > 0):
                raise ValueError(f"v_threshold must be a positive number, got {self.v_threshold!r}")
            if not (math.isfinite(self.tau) and self.tau > 1):
                raise ValueError(f"the LIF time constant tau must be > 1, got {self.tau!r}")
        if isinstance(self.targets, str) or not self.targets or not all(isinstance(t, str) for t in self.targets):
            raise ValueError(f"targets must be a non-empty sequence of name patterns, got {self.targets!r}")
        # normalise types so that equal configs compare (and serialise) equal
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "v_threshold", float(self.v_threshold))
        object.__setattr__(self, "tau", float(self.tau))
        object.__setattr__(self, "rslora", bool(self.rslora))
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scaling(self) -> float:
        """``alpha / sqrt(r)`` with rsLoRA, else ``alpha / r``."""
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> AdapterConfig:
        """Inverse of :meth:`to_dict`; unknown or missing keys are a ``ValueError``."""
        names = set(cls.__dataclass_fields__)
        if set(d) != names:
            raise ValueError(f"adapter config keys {sorted(d)} do not match the expected {sorted(names)}")
        return cls(**{**d, "targets": tuple(d["targets"])})


class AdapterLinear(nn.Module):
    """A frozen ``nn.Linear`` (kept as ``self.base``) plus a LoRA or SpikeLoRA update.

    Takes ``[B, T, k]`` and computes in the input's dtype. For SpikeLoRA ``self.gate`` is a multi-step
    LIF with one neuron per rank channel, run along T; its membrane is carried by the model's state.
    """

    def __init__(self, base: nn.Linear, config: AdapterConfig):
        super().__init__()
        if base.bias is not None:
            raise ValueError("adapters wrap bias-free linear layers only (SpikeGPT's are all bias-free)")
        self.base = base
        self.kind = config.kind
        self.r = config.r
        self.scaling = config.scaling
        w = base.weight
        a = torch.empty(config.r, base.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # what nn.Linear does to its weight
        self.lora_A = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, config.r, device=w.device, dtype=w.dtype))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.gate = make_lif(config.v_threshold, config.tau) if config.kind == "spikelora" else None
        self.merged = False
        # sparsity counters: on-device, not part of the state dict, int64 so dtype casts leave them alone
        self.register_buffer("sparsity_zeros", torch.zeros((), dtype=torch.int64, device=w.device), persistent=False)
        self.register_buffer("sparsity_total", torch.zeros((), dtype=torch.int64, device=w.device), persistent=False)
        self.token_mask: torch.Tensor | None = None
        self.token_count: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """``s * B A`` in float32 (the LoRA update as a ``[d, k]`` matrix)."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        if x.dim() != 3:
            raise ValueError(f"adapters take input of shape [B, T, features], got {tuple(x.shape)}")
        a = F.linear(self.dropout(x), self.lora_A.to(x.dtype))
        if self.gate is not None:
            a = fire(self.gate, a) * a
        self._count(a)
        return out + F.linear(a, self.lora_B.to(x.dtype)) * self.scaling

    @torch.no_grad()
    def _count(self, a: torch.Tensor) -> None:
        zeros = a == 0
        mask = self.token_mask
        if mask is None:
            self.sparsity_total += a.numel()
        else:
            if mask.shape != a.shape[:2]:
                raise ValueError(
                    f"the token mask set by set_token_mask has shape {tuple(mask.shape)} but this forward "
                    f"runs {tuple(a.shape[:2])} tokens; set a mask of shape [B, T] for each call "
                    "([B, 1] for model.step) or set_token_mask(model, None) to count every token"
                )
            zeros &= mask.unsqueeze(-1)
            self.sparsity_total += self.token_count * a.shape[-1]
        self.sparsity_zeros += zeros.sum()

    def extra_repr(self) -> str:
        return f"kind={self.kind}, r={self.r}, scaling={self.scaling:.4g}, merged={self.merged}"


# --------------------------------------------------------------------------------------------------
# attaching


def adapter_modules(model: nn.Module) -> dict[str, AdapterLinear]:
    """The adapted layers of ``model`` by module name (empty if it has none)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLinear)}


def _matches(name: str, pattern: str) -> bool:
    """A pattern matches a module name exactly, as a dotted suffix (``att.key``) or as a full regex."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def attach_adapters(
    model: SpikeGPT,
    kind: str = "spikelora",
    r: int = 8,
    alpha: float | None = None,
    rslora: bool = True,
    dropout: float = 0.0,
    v_threshold: float = 0.1,
    tau: float = 2.0,
    targets: Sequence[str] | None = None,
) -> SpikeGPT:
    """Wrap the target linear layers of ``model`` in LoRA / SpikeLoRA adapters, in place; returns ``model``.

    ``alpha=None`` is the paper's ``sqrt(r)``; ``targets`` are module-name patterns (a dotted suffix such
    as ``"att.key"`` or a regex matched against the full name; ``None`` = :data:`DEFAULT_TARGETS`). The
    base is frozen, the head (``model.head``) stays trainable in full, and the config is stored as
    ``model.adapter_config``. Paper defaults: ``kind="spikelora", r=8, alpha=None, rslora=True,
    v_threshold=0.1``; the public SpikeGPT experiment: ``r=16, alpha=16, rslora=False, v_threshold=0.25``.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"adapter rank r must be an integer >= 1, got {r!r}")
    config = AdapterConfig(
        kind=kind,
        r=r,
        alpha=alpha,
        rslora=rslora,
        dropout=dropout,
        v_threshold=v_threshold,
        tau=tau,
        targets=DEFAULT_TARGETS if targets is None else tuple(targets),
    )
    return _attach(model, config)


def _attach(model: SpikeGPT, config: AdapterConfig) -> SpikeGPT:
    if getattr(model, "adapter_config", None) is not None or adapter_modules(model):
        raise ValueError("this model already has adapters attached; attach them once (to a fresh base model)")
    candidates = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "head" and name}
    chosen: dict[str, nn.Linear] = {}
    for pattern in config.targets:
        hits = [name for name in candidates if _matches(name, pattern)]
        if not hits:
            why = " (the head is always trained in full, not adapted)" if _matches("head", pattern) else ""
            raise ValueError(
                f"adapter target pattern {pattern!r} matches no linear layer{why}; "
                f"linear layers are e.g. {sorted(candidates)[:8]}"
            )
        chosen.update((name, candidates[name]) for name in hits)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in chosen.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, AdapterLinear(linear, config))
    for p in model.head.parameters():
        p.requires_grad_(True)
    model.adapter_config = config
    return model


def _require_adapters(model: nn.Module) -> dict[str, AdapterLinear]:
    adapters = adapter_modules(model)
    if not adapters:
        raise ValueError("this model has no adapters; call attach_adapters (or load_adapters) first")
    return adapters


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def official_name(name: str) -> str:
    """The official parameter name of a (possibly adapted) model's key: drops the ``.base.`` infix."""
    return name.replace(_BASE_INFIX, ".")


# --------------------------------------------------------------------------------------------------
# sparsity


def set_token_mask(model: nn.Module, mask: torch.Tensor | None) -> None:
    """Which tokens of the next forward passes are real (``True``) for the sparsity count; ``None`` = all.

    ``mask`` is ``[B, T]`` and must match every following call until it is changed: a parallel pass
    over ``[B, T]`` ids takes a ``[B, T]`` mask, ``model.step`` a ``[B, 1]`` mask (or ``None``). A mask
    that does not match the call is a ``ValueError`` in the forward pass, never a silent miscount.
    The mask is moved to the model's device once here. A model without adapters ignores it.
    """
    adapters = adapter_modules(model)
    if not adapters:
        return
    count = None
    if mask is not None:
        if mask.dim() != 2:
            raise ValueError(f"the token mask must have shape [B, T], got {tuple(mask.shape)}")
        device = next(iter(adapters.values())).lora_A.device
        mask = mask.to(device=device, dtype=torch.bool)
        count = mask.sum()
    for m in adapters.values():
        m.token_mask = mask
        m.token_count = count


def reset_sparsity(model: nn.Module) -> None:
    """Zero the sparsity counters of every adapter (no synchronisation; nothing to do without adapters)."""
    for m in adapter_modules(model).values():
        m.sparsity_zeros.zero_()
        m.sparsity_total.zero_()


def sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of zeros in ``S(A x) * A x`` (SpikeLoRA) or ``A x`` (LoRA) since :func:`reset_sparsity`.

    Keys: every adapted module's name, each block's average over its modules (``"blocks.3"``) and
    ``"mean"``, the average over all modules (the headline figure). Only real tokens count (see
    :func:`set_token_mask`). A module that has seen no token reports NaN. One device sync.
    """
    adapters = _require_adapters(model)
    names = list(adapters)
    counts = torch.stack([torch.stack([adapters[n].sparsity_zeros, adapters[n].sparsity_total]) for n in names])
    counts = counts.tolist()
    result: dict[str, float] = {n: (z / t if t else math.nan) for n, (z, t) in zip(names, counts, strict=True)}
    blocks: dict[str, list[float]] = {}
    for n in names:
        if m := re.match(r"(blocks\.\d+)\.", n):
            blocks.setdefault(m.group(1), []).append(result[n])
    for b, values in blocks.items():
        result[b] = sum(values) / len(values)
    result["mean"] = sum(result[n] for n in names) / len(names)
    return result


# --------------------------------------------------------------------------------------------------
# merging


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (for inference); outputs are unchanged up to rounding.

    SpikeLoRA's gate depends on the input, so it cannot be merged: ``ValueError``.
    """
    adapters = _require_adapters(model)
    if any(m.gate is not None for m in adapters.values()):
        raise ValueError("SpikeLoRA adapters cannot be merged: the spiking gate depends on the input")
    with torch.no_grad():
        for m in adapters.values():
            if not m.merged:
                w = m.base.weight
                w.copy_((w.float() + m.delta_weight()).to(w.dtype))
                m.merged = True
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_adapters` (exact up to rounding in the model's dtype)."""
    with torch.no_grad():
        for m in _require_adapters(model).values():
            if m.merged:
                w = m.base.weight
                w.copy_((w.float() - m.delta_weight()).to(w.dtype))
                m.merged = False
    return model


def _check_unmerged(model: nn.Module, what: str) -> None:
    if any(m.merged for m in adapter_modules(model).values()):
        raise ValueError(f"{what} needs the base weights as they were: call unmerge_adapters(model) first")


# --------------------------------------------------------------------------------------------------
# fingerprint and checkpoints


def _is_adapter_key(name: str) -> bool:
    return name.endswith(".lora_A") or name.endswith(".lora_B")


def _is_head_key(name: str) -> bool:
    return name == "head" or name.startswith("head.")


def base_fingerprint(model: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the frozen base weights: every parameter but the adapters' and the head's.

    Tensors are taken by official name in sorted order, each as name, shape and its values rounded to
    bfloat16, so a float32 and a bfloat16 copy of the same weights (e.g. the official bf16 checkpoint
    loaded in either dtype) share a fingerprint, while any other base differs. Accepts a model (adapted
    or not) or an official state dict. Returns ``"sha256:<hex>"``.
    """
    if isinstance(model, nn.Module):
        _check_unmerged(model, "base_fingerprint")
        items = dict(model.named_parameters())
    else:
        items = dict(model)
    tensors = {official_name(k): v for k, v in items.items() if not _is_adapter_key(k) and not _is_head_key(k)}
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        data = t.to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy()
        h.update(memoryview(data).cast("B"))
    return "sha256:" + h.hexdigest()


def _head_info(head: nn.Linear) -> dict:
    return {"in": head.in_features, "out": head.out_features, "bias": head.bias is not None}


def save_adapters(model: SpikeGPT, path: str | Path, extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Write the adapter and head weights, their config and the base fingerprint to a safetensors file.

    ``extra_metadata`` (e.g. task, labels; JSON-serialisable values, strings by convention) comes back
    from :func:`read_adapter_metadata`. The file is written to a temporary name and renamed into place.
    """
    config = getattr(model, "adapter_config", None)
    if config is None:
        raise ValueError("this model has no adapters to save; call attach_adapters first")
    _check_unmerged(model, "save_adapters")

    if extra_metadata is not None and not all(isinstance(k, str) for k in extra_metadata):
        raise ValueError("extra_metadata keys must be strings")
    tensors = {
        k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if _is_adapter_key(k) or _is_head_key(k)
    }
    metadata = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "adapter_config": json.dumps(config.to_dict()),
        "base_fingerprint": base_fingerprint(model),
        "model_config": json.dumps(asdict(model.config)),
        "head": json.dumps(_head_info(model.head)),
        "extra": json.dumps(dict(extra_metadata or {})),
    }
    return atomic_save_safetensors(tensors, path, metadata)


def _raw_metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {path}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for a file it cannot parse
        raise ValueError(f"{path} is not a readable safetensors adapter file: {err}") from err
    if meta.get("format") != FILE_FORMAT:
        raise ValueError(
            f"{path} is a safetensors file but not a spikegpt-ft adapter file (format {meta.get('format')!r})"
        )
    return meta


def read_adapter_metadata(path: str | Path) -> dict:
    """The metadata of an adapter file, without a model.

    Returns ``{"format", "version", "adapter_config": dict, "base_fingerprint": str, "model_config": dict,
    "head": {"in", "out", "bias"}, "extra": dict}``; ``AdapterConfig.from_dict(meta["adapter_config"])``
    gives the config object.
    """
    path = Path(path)
    meta = _raw_metadata(path)
    try:
        out = {
            "format": meta["format"],
            "version": meta["version"],
            "base_fingerprint": meta["base_fingerprint"],
            **{k: json.loads(meta[k]) for k in ("adapter_config", "model_config", "head", "extra")},
        }
        AdapterConfig.from_dict(out["adapter_config"])  # validate
    except (KeyError, json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{path}: damaged adapter metadata ({type(err).__name__}: {err})") from err
    return out


def _fit_head(model: SpikeGPT, head: Mapping) -> None:
    """Give ``model`` a head of the saved shape (a new classification head, say) if it has another."""
    current = _head_info(model.head)
    if current == head:
        return
    if head["in"] != model.config.n_embd:
        raise ValueError(f"the saved head takes {head['in']} features but the model's width is {model.config.n_embd}")
    p = model.emb.weight
    model.head = nn.Linear(head["in"], head["out"], bias=head["bias"], device=p.device, dtype=p.dtype)
    model.config = SpikeGPTConfig(**{**model.config.__dict__, "head_out": head["out"], "head_bias": head["bias"]})


def load_adapters(model: SpikeGPT, path: str | Path) -> SpikeGPT:
    """Attach the adapters saved in ``path`` to ``model`` (its base) and load their and the head's weights.

    The model must be the same base the adapters were trained on (checked by fingerprint) and either
    carry no adapters yet or exactly the saved config. Returns ``model``.
    """
    path = Path(path)
    meta = read_adapter_metadata(path)
    config = AdapterConfig.from_dict(meta["adapter_config"])
    existing = getattr(model, "adapter_config", None)
    if existing is not None and existing != config:
        raise ValueError(f"the model already carries adapters {existing} that differ from the saved {config}")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{path} is not a readable safetensors adapter file: {err}") from err
    wrong_rank = [
        f"{k} {tuple(t.shape)}"
        for k, t in tensors.items()
        if (k.endswith(".lora_A") and (t.dim() != 2 or t.shape[0] != config.r))
        or (k.endswith(".lora_B") and (t.dim() != 2 or t.shape[1] != config.r))
    ]
    if wrong_rank:
        raise ValueError(f"{path}: adapter tensors do not have the rank r={config.r} of its config: {wrong_rank[:4]}")
    fingerprint = base_fingerprint(model)
    if fingerprint != meta["base_fingerprint"]:
        raise ValueError(
            f"{path} was trained on another base model (base fingerprint {meta['base_fingerprint'][:19]}..., "
            f"this model {fingerprint[:19]}...); load the base it was made for"
        )
    if existing is None:
        _attach(model, config)
    _fit_head(model, meta["head"])
    sd = model.state_dict()
    expected = {k for k in sd if _is_adapter_key(k) or _is_head_key(k)}
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"{path} does not fit this model: missing {missing[:6]}, unexpected {unexpected[:6]}")
    bad = [f"{k} {tuple(t.shape)} vs {tuple(sd[k].shape)}" for k, t in tensors.items() if t.shape != sd[k].shape]
    if bad:
        raise ValueError(f"{path}: tensor shapes do not match the adapters (rank r={config.r}): {bad[:4]}")
    with torch.no_grad():
        for k, t in tensors.items():
            sd[k].copy_(t)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter and head tensors of ``model`` (what :func:`save_adapters` writes)."""
    return {k: v for k, v in model.state_dict().items() if _is_adapter_key(k) or _is_head_key(k)}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's weights (head included) under their official names, adapters left out."""
    return {official_name(k): v for k, v in model.state_dict().items() if not _is_adapter_key(k)}


__all__ = [
    "DEFAULT_TARGETS",
    "AdapterConfig",
    "AdapterLinear",
    "adapter_modules",
    "adapter_state_dict",
    "attach_adapters",
    "base_fingerprint",
    "base_state_dict",
    "count_parameters",
    "load_adapters",
    "merge_adapters",
    "official_name",
    "read_adapter_metadata",
    "reset_sparsity",
    "save_adapters",
    "set_token_mask",
    "sparsity",
    "unmerge_adapters",
]
