"""Adapter files: the adapter and head weights, their config and a fingerprint of the frozen base.

An adapter file is a small safetensors file (``format = spikegpt-ft-adapters``) holding only the
``lora_A`` / ``lora_B`` tensors and the head, with JSON metadata: the :class:`~.config.AdapterConfig`, the
base model's config, the head's shape and :func:`base_fingerprint` of the base it was trained on, so that
:func:`load_adapters` refuses any other base. Files of format version 1 (before the pointwise gate) load
as temporal-gate adapters.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..files import atomic_save_safetensors, load_safetensors, safetensors_metadata
from ..model import SpikeGPT, SpikeGPTConfig
from ..ops import Linear
from .config import AdapterConfig
from .inject import attach, check_unmerged, official_name
from .layer import AdapterLinear

#: ``format`` entry of an adapter file's metadata.
FILE_FORMAT = "spikegpt-ft-adapters"
FILE_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
WHAT = "spikegpt-ft adapter file"


def is_adapter_key(name: str) -> bool:
    """Whether a state-dict key is an adapter matrix (``...lora_A`` / ``...lora_B``)."""
    return name.endswith(".lora_A") or name.endswith(".lora_B")


def is_head_key(name: str) -> bool:
    """Whether a state-dict key belongs to the head."""
    return name == "head" or name.startswith("head.")


def base_fingerprint(model: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the frozen base weights: every parameter but the adapters' and the head's.

    Tensors are taken by official name in sorted order, each as name, shape and its values rounded to
    bfloat16, so a float32 and a bfloat16 copy of the same weights (e.g. the official bf16 checkpoint
    loaded in either dtype) share a fingerprint, while any other base differs. Accepts a model (adapted
    or not) or an official state dict. Returns ``"sha256:<hex>"``.
    """
    if isinstance(model, nn.Module):
        check_unmerged(model, "base_fingerprint")
        items = dict(model.named_parameters())
    else:
        items = dict(model)
    tensors = {official_name(k): v for k, v in items.items() if not is_adapter_key(k) and not is_head_key(k)}
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        data = t.to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy()
        h.update(memoryview(data).cast("B"))
    return "sha256:" + h.hexdigest()


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter and head tensors of ``model`` (what :func:`save_adapters` writes)."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k) or is_head_key(k)}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's weights (head included) under their official names, adapters left out."""
    return {official_name(k): v for k, v in model.state_dict().items() if not is_adapter_key(k)}


def _head_info(head: nn.Module) -> dict:
    linear = getattr(head, "base", head)  # an adapted head's own linear layer
    return {"in": linear.in_features, "out": linear.out_features, "bias": linear.bias is not None}


def save_adapters(model: SpikeGPT, path: str | Path, extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Write the adapter and head weights, their config and the base fingerprint to a safetensors file.

    ``extra_metadata`` (e.g. task, labels; JSON-serialisable values, strings by convention) comes back
    from :func:`read_adapter_metadata`. The file is written to a temporary name and renamed into place.
    """
    config = getattr(model, "adapter_config", None)
    if config is None:
        raise ValueError("this model has no adapters to save; call attach_adapters first")
    check_unmerged(model, "save_adapters")
    if extra_metadata is not None and not all(isinstance(k, str) for k in extra_metadata):
        raise ValueError("extra_metadata keys must be strings")
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
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


def read_adapter_metadata(path: str | Path) -> dict:
    """The metadata of an adapter file, without a model.

    Returns ``{"format", "version", "adapter_config": AdapterConfig, "base_fingerprint": str,
    "model_config": dict, "head": {"in", "out", "bias"}, "extra": dict}``. A file that is not an adapter
    file, or whose metadata is damaged, is a ``ValueError`` naming it.
    """
    path = Path(path)
    meta = safetensors_metadata(path, WHAT)
    if meta.get("format") != FILE_FORMAT:
        raise ValueError(f"{path} is a safetensors file but not a {WHAT} (format {meta.get('format')!r})")
    if meta.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{path}: {WHAT} version {meta.get('version')!r} is not one this version reads")
    try:
        out = {
            "format": meta["format"],
            "version": meta["version"],
            "base_fingerprint": meta["base_fingerprint"],
            **{k: json.loads(meta[k]) for k in ("adapter_config", "model_config", "head", "extra")},
        }
        out["adapter_config"] = AdapterConfig.from_dict(out["adapter_config"])
        head = out["head"]
        if not (isinstance(head, dict) and set(head) == {"in", "out", "bias"}):
            raise ValueError(f"head must be {{in, out, bias}}, got {head!r}")
    except (KeyError, json.JSONDecodeError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: damaged {WHAT} metadata ({type(err).__name__}: {err})") from err
    return out


def _fit_head(model: SpikeGPT, head: Mapping) -> None:
    """Give ``model`` a head of the saved shape (a new classification head, say) if it has another."""
    if _head_info(model.head) == head:
        return
    if head["in"] != model.config.n_embd:
        raise ValueError(f"the saved head takes {head['in']} features but the model's width is {model.config.n_embd}")
    p = model.emb.weight
    model.head = Linear(head["in"], head["out"], bias=head["bias"], device=p.device, dtype=p.dtype)
    model.config = SpikeGPTConfig(**{**model.config.__dict__, "head_out": head["out"], "head_bias": head["bias"]})


def load_adapters(model: SpikeGPT, path: str | Path) -> SpikeGPT:
    """Attach the adapters saved in ``path`` to ``model`` (its base) and load their and the head's weights.

    The model must be the same base the adapters were trained on (checked by fingerprint) and either
    carry no adapters yet or exactly the saved config. Returns ``model``.
    """
    path = Path(path)
    meta = read_adapter_metadata(path)
    config: AdapterConfig = meta["adapter_config"]
    existing = getattr(model, "adapter_config", None)
    if existing is not None and existing != config:
        raise ValueError(f"the model already carries adapters {existing} that differ from the saved {config}")
    tensors = load_safetensors(path, WHAT)
    wrong_rank = [
        f"{k} {tuple(t.shape)}"
        for k, t in tensors.items()
        if (k.endswith(".lora_A") and (t.dim() != 2 or t.shape[0] != config.rank))
        or (k.endswith(".lora_B") and (t.dim() != 2 or t.shape[1] != config.rank))
    ]
    if wrong_rank:
        raise ValueError(f"{path}: adapter tensors do not have the rank {config.rank} of its config: {wrong_rank[:4]}")
    fingerprint = base_fingerprint(model)
    if fingerprint != meta["base_fingerprint"]:
        raise ValueError(
            f"{path} was trained on another base model (base fingerprint {meta['base_fingerprint'][:19]}..., "
            f"this model {fingerprint[:19]}...); load the base it was made for"
        )
    if existing is None:
        _fit_head(model, meta["head"])  # before attaching: the adapters may include one on the head
        attach(model, config)
    elif _head_info(model.head) != meta["head"]:
        if isinstance(model.head, AdapterLinear):
            raise ValueError(
                f"{path}: the saved head {meta['head']} differs from this model's {_head_info(model.head)}"
            )
        _fit_head(model, meta["head"])  # a plain head: replaced by one of the saved shape, trained as attach does
        model.head.requires_grad_(True)
    sd = model.state_dict()
    expected = {k for k in sd if is_adapter_key(k) or is_head_key(k)}
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"{path} does not fit this model: missing {missing[:6]}, unexpected {unexpected[:6]}")
    bad = [f"{k} {tuple(t.shape)} vs {tuple(sd[k].shape)}" for k, t in tensors.items() if t.shape != sd[k].shape]
    if bad:
        raise ValueError(f"{path}: tensor shapes do not match the adapters (rank {config.rank}): {bad[:4]}")
    with torch.no_grad():
        for k, t in tensors.items():
            sd[k].copy_(t)
    return model
