"""Text generation from a SpikeGPT language model: the prompt prefilled, then one token per step."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..model import SpikeGPT
from .stepping import DEFAULT_CHUNK, evaluating, prefill, token_feeder


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` ``[V]`` restricted to the nucleus and renormalised.

    The nucleus is the smallest set of most probable tokens whose total probability reaches
    ``top_p`` (at least the most probable token); ties at the boundary are broken by sort order.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    sorted_p, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_p, 0) - sorted_p  # mass of the more probable tokens
    keep_sorted = before < top_p
    keep_sorted[0] = True
    keep = torch.zeros_like(keep_sorted)
    keep[order] = keep_sorted
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return kept / kept.sum()


def sample_next(
    logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> int:
    """The next token from ``logits`` ``[V]``: argmax at temperature 0, else nucleus sampling."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits.detach().float().cpu()
    if temperature == 0:
        return int(logits.argmax())
    probs = nucleus(torch.softmax(logits / temperature, dim=-1), top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def iter_generate(
    model: SpikeGPT,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    stop_ids: Sequence[int] = (),
    chunk_len: int = DEFAULT_CHUNK,
) -> Iterator[int]:
    """Generate up to ``max_tokens`` tokens after ``prompt_ids``, yielding each as it is chosen.

    The prompt is prefilled (in chunks, carrying the state); then each new token goes through
    ``model.step`` from the carried state, on CUDA as a CUDA graph (:class:`~spikegpt_ft.decoding.GraphedStepper`,
    captured at the first new token). Stops early after a token in ``stop_ids`` (which is yielded).
    """
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    if temperature > 0:
        nucleus(torch.ones(1), top_p)  # validate top_p before any work
    logits, state = prefill(model, prompt_ids, chunk_len=chunk_len)
    feed = None
    for n in range(max_tokens):
        token = sample_next(logits, temperature, top_p, generator)
        yield token
        if token in stop_ids or n == max_tokens - 1:
            return
        with evaluating(model):  # entered per token: a context held across ``yield`` would leak to the caller
            feed = feed or token_feeder(model, state)
            logits = feed(token)


def generate(model: SpikeGPT, prompt_ids: Sequence[int] | torch.Tensor, max_tokens: int, **kwargs) -> list[int]:
    """The tokens of :func:`iter_generate` as a list."""
    return list(iter_generate(model, prompt_ids, max_tokens, **kwargs))
