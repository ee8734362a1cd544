"""Inference with a SpikeGPT: classification in recurrent or parallel mode, streaming, and generation.

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

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .adapters import set_token_mask
from .decoding import GraphedStepper
from .model import SpikeGPT
from .state import RecurrentState

#: Tokens per parallel pass; longer texts continue from the carried state (SpikeGPT-216M's ctx_len).
DEFAULT_CHUNK = 1024
#: Texts stepped together in recurrent mode (or padded together in parallel mode).
DEFAULT_BATCH = 64
#: Token id used to fill the tail of shorter texts in a parallel chunk (``<|padding|>``); it is never read.
PAD_ID = 1
MODES = ("recurrent", "parallel")


@contextlib.contextmanager
def _eval(model: SpikeGPT):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _as_lists(ids_list: Sequence[Sequence[int]] | Sequence[torch.Tensor]) -> list[list[int]]:
    out = []
    for i, ids in enumerate(ids_list):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if not ids:
            raise ValueError(f"text {i} has no tokens; give at least one token per text")
        out.append(ids)
    return out


def _padded(seqs: list[list[int]], device: torch.device) -> torch.Tensor:
    """``[B, T_max]`` int64 of ``seqs`` right-padded with :data:`PAD_ID`."""
    ids = torch.full((len(seqs), max(map(len, seqs))), PAD_ID, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids.to(device)


def _batch_logits_recurrent(model: SpikeGPT, seqs: list[list[int]]) -> torch.Tensor:
    """Logits at each text's last token, ``seqs`` sorted longest first, one token per step."""
    device = model.emb.weight.device
    ids = _padded(seqs, device)
    lengths = [len(s) for s in seqs]
    out: list[torch.Tensor | None] = [None] * len(seqs)
    state = model.init_state(len(seqs))
    set_token_mask(model, None)
    for t in range(ids.shape[1]):
        active = sum(1 for n in lengths if n > t)  # a prefix, as the texts are sorted longest first
        if active < state.batch_size:
            state = state.select(slice(0, active))
        logits, state = model.step(ids[:active, t], state)
        for row in range(active):
            if lengths[row] == t + 1:
                out[row] = logits[row].float()
    return torch.stack(out)


def _batch_logits_parallel(model: SpikeGPT, seqs: list[list[int]], chunk_len: int) -> torch.Tensor:
    """Logits at each text's last token, ``seqs`` sorted longest first, ``chunk_len`` tokens per pass."""
    ids = _padded(seqs, model.emb.weight.device)
    lengths = [len(s) for s in seqs]
    out: list[torch.Tensor | None] = [None] * len(seqs)
    state: RecurrentState = model.init_state(len(seqs))
    for start in range(0, ids.shape[1], chunk_len):
        active = sum(1 for n in lengths if n > start)  # a prefix, as the texts are sorted longest first
        if active < state.batch_size:
            state = state.select(slice(0, active))
        chunk = ids[:active, start : start + chunk_len]
        positions = torch.arange(start, start + chunk.shape[1])
        set_token_mask(model, positions.unsqueeze(0) < torch.tensor(lengths[:active]).unsqueeze(1))
        logits, state = model.prefill(chunk, state)
        for row in range(active):
            last = lengths[row] - 1 - start
            if last < chunk.shape[1]:  # >= 0 for every active row
                out[row] = logits[row, last].float()
    set_token_mask(model, None)
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
    seqs = _as_lists(ids_list)
    if not seqs:
        return torch.zeros(0, model.config.head_out)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    result = torch.empty(len(seqs), model.config.head_out)
    with _eval(model):
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
    (seq,) = _as_lists([ids])
    feed = None
    for token in seq:
        with _eval(model):  # entered per token: a context held across ``yield`` would leak to the caller
            set_token_mask(model, None)
            feed = feed or _token_feeder(model, model.init_state(1))
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


def _uses_graph(device: torch.device) -> bool:
    """Whether token-by-token decoding on ``device`` goes through a CUDA graph (on CUDA, where one exists)."""
    return device.type == "cuda"


def _token_feeder(model: SpikeGPT, state: RecurrentState) -> Callable[[int], torch.Tensor]:
    """A function that feeds one token to the single sequence of ``state`` and returns its logits ``[V]``.

    The state is carried inside. Call it (and build it) in eval mode under ``torch.no_grad``. Where
    :func:`_uses_graph`, the logits are a view of the stepper's buffer, valid until the next call.
    """
    device = model.emb.weight.device
    if _uses_graph(device):
        stepper = GraphedStepper(model, 1)
        stepper.load_state(state)
        return lambda token: stepper.step(torch.tensor([token]))[0]

    def feed(token: int) -> torch.Tensor:
        nonlocal state
        logits, state = model.step(torch.tensor([token], device=device), state)
        return logits[0]

    return feed


def prefill(
    model: SpikeGPT,
    ids: Sequence[int] | torch.Tensor,
    state: RecurrentState | None = None,
    chunk_len: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, RecurrentState]:
    """Run one sequence through ``model.prefill`` in chunks; returns its last logits ``[V]`` and the state."""
    (seq,) = _as_lists([ids])
    device = model.emb.weight.device
    state = state if state is not None else model.init_state(1)
    ids_t = torch.tensor([seq], dtype=torch.long, device=device)
    with _eval(model):
        set_token_mask(model, None)
        for start in range(0, ids_t.shape[1], chunk_len):
            logits, state = model.prefill(ids_t[:, start : start + chunk_len], state)
    return logits[0, -1], state


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
        with _eval(model):  # entered per token: a context held across ``yield`` would leak to the caller
            feed = feed or _token_feeder(model, state)
            logits = feed(token)


def generate(model: SpikeGPT, prompt_ids: Sequence[int] | torch.Tensor, max_tokens: int, **kwargs) -> list[int]:
    """The tokens of :func:`iter_generate` as a list."""
    return list(iter_generate(model, prompt_ids, max_tokens, **kwargs))
