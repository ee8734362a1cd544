"""Putting adapters into a SpikeGPT and taking them out: attaching, merging, counting parameters.

:func:`attach_adapters` wraps the target linear layers in :class:`~.layer.AdapterLinear`, in place, freezes
the base and leaves the head (``model.head``) trainable; the config is kept as ``model.adapter_config``.
The base weight of an adapted layer is ``<module>.base.weight``; :func:`official_name` maps such a key back
to the official one (``blocks.0.att.key.base.weight`` -> ``blocks.0.att.key.weight``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from ..model import SpikeGPT
from .config import DEFAULT_TARGETS, AdapterConfig
from .layer import AdapterLinear

BASE_INFIX = ".base."


def adapter_modules(model: nn.Module) -> dict[str, AdapterLinear]:
    """The adapted layers of ``model`` by module name (empty if it has none)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLinear)}


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of ``root``'s submodule ``name`` (a dotted path)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def matches(name: str, pattern: str) -> bool:
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
    gate: str = "temporal",
) -> SpikeGPT:
    """Wrap the target linear layers of ``model`` in LoRA / SpikeLoRA adapters, in place; returns ``model``.

    ``alpha=None`` is the paper's ``sqrt(r)``; ``targets`` are module-name patterns (a dotted suffix such
    as ``"att.key"`` or a regex matched against the full name; ``None`` = :data:`DEFAULT_TARGETS`);
    ``gate`` is SpikeLoRA's gate mode, ``"temporal"`` or ``"pointwise"`` (see :data:`~.config.GATES`).
    The base is frozen and the head stays trainable in full; a target ``"head"`` adds an adapter to the head as
    well (its weight still trained in full, as the SpikeLoRA authors' SpikeGPT experiment does). The config is
    stored as ``model.adapter_config``.
    """
    config = AdapterConfig(
        kind=kind,
        rank=r,
        alpha=alpha,
        rslora=rslora,
        lora_dropout=dropout,
        v_threshold=v_threshold,
        tau=tau,
        gate=gate,
        targets=DEFAULT_TARGETS if targets is None else tuple(targets),
    )
    return attach(model, config)


def attach(model: SpikeGPT, config: AdapterConfig) -> SpikeGPT:
    """:func:`attach_adapters` from an :class:`AdapterConfig`."""
    if getattr(model, "adapter_config", None) is not None or adapter_modules(model):
        raise ValueError("this model already has adapters attached; attach them once (to a fresh base model)")
    candidates = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name}
    chosen: dict[str, nn.Linear] = {}
    for pattern in config.targets:
        hits = [name for name in candidates if matches(name, pattern)]
        if not hits:
            raise ValueError(
                f"adapter target pattern {pattern!r} matches no linear layer; "
                f"linear layers are e.g. {sorted(candidates)[:8]}"
            )
        chosen.update((name, candidates[name]) for name in hits)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in chosen.items():
        replace_module(model, name, AdapterLinear(linear, config))
    for p in model.head.parameters():
        p.requires_grad_(True)
    model.adapter_config = config
    return model


def require_adapters(model: nn.Module) -> dict[str, AdapterLinear]:
    """:func:`adapter_modules`, or a ``ValueError`` when there are none."""
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
    return name.replace(BASE_INFIX, ".")


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (for inference); outputs are unchanged up to rounding.

    SpikeLoRA's gate depends on the input, so it cannot be merged: ``ValueError``.
    """
    adapters = require_adapters(model)
    if any(m.gate is not None for m in adapters.values()):
        raise ValueError("SpikeLoRA adapters cannot be merged: the spiking gate depends on the input")
    for m in adapters.values():
        m.merge()
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_adapters` (exact up to rounding in the model's dtype)."""
    for m in require_adapters(model).values():
        m.unmerge()
    return model


def check_unmerged(model: nn.Module, what: str) -> None:
    """A ``ValueError`` if any adapter of ``model`` is merged (``what`` needs the base weights as they were)."""
    if any(m.merged for m in adapter_modules(model).values()):
        raise ValueError(f"{what} needs the base weights as they were: call unmerge_adapters(model) first")
