"""Stepping a SpikeGPT one token at a time, or a text in chunks, carrying its recurrent state.

Shared by classification (``classify.py``) and generation (``generate.py``). Every function leaves the
model's train/eval mode as it found it and runs under ``torch.no_grad``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from ..model import RecurrentState, SpikeGPT
from .decoding import GraphedStepper

#: Tokens per parallel pass; longer texts continue from the carried state (SpikeGPT-216M's ctx_len).
DEFAULT_CHUNK = 1024


@contextlib.contextmanager
def evaluating(model: SpikeGPT) -> Iterator[None]:
    """Eval mode and no gradients inside; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def as_token_lists(ids_list: Sequence[Sequence[int]] | Sequence[torch.Tensor]) -> list[list[int]]:
    """Token id lists of the texts; a text without tokens is a ``ValueError`` naming it."""
    out = []
    for i, ids in enumerate(ids_list):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if not ids:
            raise ValueError(f"text {i} has no tokens; give at least one token per text")
        out.append(ids)
    return out


def token_feeder(model: SpikeGPT, state: RecurrentState) -> Callable[[int], torch.Tensor]:
    """A function that feeds one token to the single sequence of ``state`` and returns its logits ``[V]``.

    The state is carried inside a :class:`GraphedStepper` (a CUDA graph on CUDA, the compiled step on the
    CPU where the model allows it). Call it (and build it) in eval mode under ``torch.no_grad``. The logits
    are a view of the stepper's buffer, valid until the next call.
    """
    stepper = GraphedStepper(model, 1)
    stepper.load_state(state)
    return lambda token: stepper.step(torch.tensor([token]))[0]


def prefill(
    model: SpikeGPT,
    ids: Sequence[int] | torch.Tensor,
    state: RecurrentState | None = None,
    chunk_len: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, RecurrentState]:
    """Run one sequence through ``model.prefill`` in chunks; returns its last logits ``[V]`` and the state."""
    (seq,) = as_token_lists([ids])
    device = model.emb.weight.device
    state = state if state is not None else model.init_state(1)
    ids_t = torch.tensor([seq], dtype=torch.long, device=device)
    with evaluating(model):
        for start in range(0, ids_t.shape[1], chunk_len):
            logits, state = model.prefill(ids_t[:, start : start + chunk_len], state)
    return logits[0, -1], state
