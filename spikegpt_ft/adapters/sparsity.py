"""SpikeLoRA's sparsity: the fraction of zeros of the gated down-projection ``S(A x) * A x``, per module.

Counting is explicit and scoped: a :class:`SparsityMeter` over a model counts only the forward passes run
inside its :meth:`~SparsityMeter.recording` context, and only the real tokens that context's mask names::

    meter = SparsityMeter(model)
    with meter.recording(mask):          # mask [B, T] of real tokens, or None for every token
        model(ids)
    meter.result()                       # {"blocks.0.att.key": 0.71, ..., "blocks.0": 0.69, "mean": 0.70}

Nothing is parked on the modules: the active recording is a context variable that each gated adapter
reports to (:func:`record`), so a forward pass outside any recording counts nothing and costs nothing.
The counts stay on the device (no synchronisation) until :meth:`~SparsityMeter.result`.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from . import layer


@dataclass
class _Recording:
    meter: SparsityMeter
    mask: torch.Tensor | None
    real_tokens: torch.Tensor | None


_ACTIVE: ContextVar[_Recording | None] = ContextVar("spikegpt_ft_sparsity_recording", default=None)


class SparsityMeter:
    """Zeros and totals of ``S(A x) * A x`` for every gated adapter of ``model``, over recorded passes."""

    def __init__(self, model: nn.Module):
        gated = [
            (name, m) for name, m in model.named_modules() if isinstance(m, layer.AdapterLinear) and m.gate is not None
        ]
        self._order = [name for name, _ in gated]
        self._index = {id(m): i for i, (_, m) in enumerate(gated)}
        self._counts: torch.Tensor | None = None  # [modules, 2] int64: zeros, total

    def __len__(self) -> int:
        return len(self._order)

    def tracks(self, module: nn.Module) -> bool:
        """Whether ``module`` is one of the gated adapters this meter counts."""
        return id(module) in self._index

    @contextlib.contextmanager
    def recording(self, mask: torch.Tensor | None = None) -> Iterator[SparsityMeter]:
        """Count the gated adapters' zeros in the forward passes run inside; ``mask`` ``[B, T]`` marks real tokens.

        Every pass inside must run ``[B, T]`` tokens of the mask's shape (``[B, 1]`` for ``model.step``); a
        pass of another shape is a ``ValueError``, never a silent miscount.
        """
        count = None
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError(f"the token mask must have shape [B, T], got {tuple(mask.shape)}")
            mask = mask.to(torch.bool)
            count = mask.sum()
        token = _ACTIVE.set(_Recording(self, mask, count))
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def add(self, module: nn.Module, gated: torch.Tensor, mask: torch.Tensor | None, real: torch.Tensor | None) -> None:
        """Add the zeros of one adapter's gated activations ``[B, T, r]`` (called through :func:`record`)."""
        index = self._index[id(module)]
        if self._counts is None:
            with torch.inference_mode(False):  # a normal tensor, so that passes outside inference mode add to it
                self._counts = torch.zeros(len(self._order), 2, dtype=torch.int64, device=gated.device)
        zeros = gated == 0
        if mask is None:
            total = gated.numel()
        else:
            if mask.shape != gated.shape[:2]:
                raise ValueError(
                    f"the sparsity recording's token mask has shape {tuple(mask.shape)} but this forward pass runs "
                    f"{tuple(gated.shape[:2])} tokens; record each pass with a mask of its [B, T] shape"
                )
            mask = mask.to(gated.device)
            zeros &= mask.unsqueeze(-1)
            total = real.to(gated.device) * gated.shape[-1]
        self._counts[index, 0] += zeros.sum()
        self._counts[index, 1] += total

    def reset(self) -> None:
        """Forget what was counted."""
        if self._counts is not None:
            self._counts.zero_()

    def counts(self) -> torch.Tensor:
        """``[modules, 2]`` int64 zeros and totals in module order (zeros before anything was recorded)."""
        if self._counts is None:
            return torch.zeros(len(self._order), 2, dtype=torch.int64)
        return self._counts

    def result(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """Fraction of zeros per module, per block (``"blocks.3"``: mean of its modules) and ``"mean"``.

        ``reduce`` sums the counts over processes (e.g. a Lightning strategy's ``reduce(..., "sum")``), so every
        rank reports the figure of the whole set. A module that saw no token reports NaN. One device sync.
        """
        if not self._order:
            return {}
        counts = self.counts()
        if reduce is not None:
            counts = reduce(counts.double())
        rows = counts.tolist()
        result = {name: (z / t if t else math.nan) for name, (z, t) in zip(self._order, rows, strict=True)}
        blocks: dict[str, list[float]] = {}
        for name in self._order:
            if m := re.match(r"(blocks\.\d+)\.", name):
                blocks.setdefault(m.group(1), []).append(result[name])
        for block, values in blocks.items():
            result[block] = sum(values) / len(values)
        result["mean"] = sum(result[n] for n in self._order) / len(self._order)
        return result


def is_recording() -> bool:
    """Whether a :meth:`SparsityMeter.recording` is active (then a caller computing the gates itself reports)."""
    return _ACTIVE.get() is not None


def record(module: nn.Module, gated: torch.Tensor) -> None:
    """Report a gated adapter's activations to the active recording, if any (called by the adapter)."""
    active = _ACTIVE.get()
    if active is not None and active.meter.tracks(module):
        with torch.no_grad():
            active.meter.add(module, gated, active.mask, active.real_tokens)


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Count nothing inside, whatever recording is active outside (e.g. while a CUDA graph is captured)."""
    token = _ACTIVE.set(None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
