"""Classification with a SpikeGPT in recurrent or parallel mode, and streaming predictions.

Recurrent mode is the deployment view of a spiking model: tokens enter one at a time through
:meth:`SpikeGPT.step` and the recurrent state carries everything else. A batch of texts of different
lengths is stepped together, longest first; a sequence leaves the batch (``RecurrentState.select``) at
its own last token, where its logits are read, so no padding is ever fed. Parallel mode runs the same
texts through :meth:`SpikeGPT.prefill` in chunks of ``chunk_len`` tokens, carrying the state between
chunks, so no text is ever truncated; its logits are read at each text's last real token.

Every function takes the model as it is (classifier or language model) and leaves its train/eval
mode as it found it; it runs in eval mode under ``torch.no_grad``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..data.batching import pad_right
from ..model import RecurrentState, SpikeGPT
from .decoding import step_function
from .stepping import DEFAULT_CHUNK, as_token_lists, evaluating, token_feeder

#: Texts stepped together in recurrent mode (or padded together in parallel mode).
DEFAULT_BATCH = 64
MODES = ("recurrent", "parallel")


def _batch_logits_recurrent(model: SpikeGPT, seqs: list[list[int]]) -> torch.Tensor:
    """Logits at each text's last token, ``seqs`` sorted longest first, one token per step.

    On the CPU the steps run compiled where the model allows it (:func:`~spikegpt_ft.inference.decoding.step_function`,
    bitwise ``model.step``), made anew whenever the batch shrinks.
    """
    device = model.emb.weight.device
    ids = pad_right(seqs)[0].to(device)
    lengths = [len(s) for s in seqs]
    out: list[torch.Tensor | None] = [None] * len(seqs)
    state = model.init_state(len(seqs))
    step = step_function(model, len(seqs))
    for t in range(ids.shape[1]):
        active = sum(1 for n in lengths if n > t)  # a prefix, as the texts are sorted longest first
        if active < state.batch_size:
            state = state.select(slice(0, active))
            step = step_function(model, active)
        logits, state = step(ids[:active, t], state)
        for row in range(active):
            if lengths[row] == t + 1:
                out[row] = logits[row].float()
    return torch.stack(out)


def _batch_logits_parallel(model: SpikeGPT, seqs: list[list[int]], chunk_len: int) -> torch.Tensor:
    """Logits at each text's last token, ``seqs`` sorted longest first, ``chunk_len`` tokens per pass."""
    ids = pad_right(seqs)[0].to(model.emb.weight.device)
    lengths = [len(s) for s in seqs]
    out: list[torch.Tensor | None] = [None] * len(seqs)
    state: RecurrentState = model.init_state(len(seqs))
    for start in range(0, ids.shape[1], chunk_len):
        active = sum(1 for n in lengths if n > start)  # a prefix, as the texts are sorted longest first
        if active < state.batch_size:
            state = state.select(slice(0, active))
        chunk = ids[:active, start : start + chunk_len]
        logits, state = model.prefill(chunk, state)
        for row in range(active):
            last = lengths[row] - 1 - start
            if last < chunk.shape[1]:  # >= 0 for every active row
                out[row] = logits[row, last].float()
    return torch.stack(out)


def class_logits(
    model: SpikeGPT,
    ids_list: Sequence[Sequence[int]] | Sequence[torch.Tensor],
    mode: str = "recurrent",
    batch_size: int = DEFAULT_BATCH,
    chunk_len: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Head outputs ``[N, n_out]`` (float32, on the CPU) at the last token of each of ``N`` texts.

    ``mode`` ``"recurrent"`` feeds tokens one at a time through ``model.step``; ``"parallel"`` runs
    chunks of ``chunk_len`` tokens through ``model.prefill``. Texts are grouped by length into batches
    of ``batch_size``; the order of the result is the order of ``ids_list``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if batch_size < 1 or chunk_len < 1:
        raise ValueError(f"batch_size and chunk_len must be positive, got {batch_size} and {chunk_len}")
    seqs = as_token_lists(ids_list)
    if not seqs:
        return torch.zeros(0, model.config.head_out)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    result = torch.empty(len(seqs), model.config.head_out)
    with evaluating(model):
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            batch = [seqs[i] for i in rows]
            if mode == "recurrent":
                logits = _batch_logits_recurrent(model, batch)
            else:
                logits = _batch_logits_parallel(model, batch, chunk_len)
            result[rows] = logits.cpu()
    return result


def classify(
    model: SpikeGPT,
    ids_list: Sequence[Sequence[int]] | Sequence[torch.Tensor],
    mode: str = "recurrent",
    batch_size: int = DEFAULT_BATCH,
    chunk_len: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Class probabilities ``[N, n_classes]`` (softmax of :func:`class_logits`); the label is the argmax."""
    return torch.softmax(class_logits(model, ids_list, mode, batch_size, chunk_len), dim=-1)


def stream(model: SpikeGPT, ids: Sequence[int] | torch.Tensor) -> Iterator[torch.Tensor]:
    """Class probabilities ``[n_classes]`` after each token of one text: the running prediction.

    One tensor per token; the last one is the prediction for the whole text. On CUDA the tokens go
    through a CUDA graph (:class:`~spikegpt_ft.decoding.GraphedStepper`), elsewhere through ``model.step``.
    """
    (seq,) = as_token_lists([ids])
    feed = None
    for token in seq:
        with evaluating(model):  # entered per token: a context held across ``yield`` would leak to the caller
            feed = feed or token_feeder(model, model.init_state(1))
            logits = feed(token)
        yield torch.softmax(logits.float(), dim=-1).cpu()


@dataclass
class Evaluation:
    """Accuracy of one mode on a labelled set."""

    mode: str
    accuracy: float
    predictions: list[int]
    n: int


def evaluate(
    model: SpikeGPT,
    ids_list: Sequence[Sequence[int]] | Sequence[torch.Tensor],
    labels: Sequence[int],
    mode: str = "recurrent",
    batch_size: int = DEFAULT_BATCH,
    chunk_len: int = DEFAULT_CHUNK,
) -> Evaluation:
    """Accuracy of ``model`` on ``ids_list`` against integer ``labels`` in ``mode``."""
    if len(ids_list) != len(labels):
        raise ValueError(f"{len(ids_list)} texts but {len(labels)} labels")
    if not len(labels):
        raise ValueError("nothing to evaluate: no texts given")
    predictions = class_logits(model, ids_list, mode, batch_size, chunk_len).argmax(-1).tolist()
    correct = sum(int(p == int(y)) for p, y in zip(predictions, labels, strict=True))
    return Evaluation(mode, correct / len(labels), predictions, len(labels))


def agreement(a: Evaluation, b: Evaluation) -> float:
    """Fraction of examples on which two evaluations predict the same class."""
    if a.n != b.n:
        raise ValueError(f"evaluations of {a.n} and {b.n} examples cannot be compared")
    return sum(int(x == y) for x, y in zip(a.predictions, b.predictions, strict=True)) / a.n
