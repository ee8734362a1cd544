"""Plain text for language-model training: documents, splits by document, and packed token windows.

A corpus is one or more sources: a text file (one document per line, or the whole file one document) or
a folder written by ``datasets.Dataset.save_to_disk`` with a ``text`` column (one document per row).
Documents are split into train / validation / test by document (seeded), never by window, so that no text
of a test document is trained on. Each split's documents are tokenised, each followed by
``<|endoftext|>``, concatenated, and cut into windows of ``context_length + 1`` tokens overlapping by one
(the inputs are a window's first ``context_length`` tokens, the targets its last): every token of a split
but the first is predicted exactly once. Windows never hold tokens of two splits.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .batching import SplitsDataModule, pad_right
from .reading import decode_lines, split_lines
from .splits import split_fingerprint
from .tokenizer import EOS_ID, PAD_ID, find_tokenizer, load_tokenizer

log = logging.getLogger(__name__)

#: How a text file is cut into documents.
TEXT_UNITS = ("line", "file")
#: Target id that the loss ignores (padding of the last, shorter window).
IGNORE_INDEX = -100


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file())


def read_documents(sources: Sequence[str | Path], unit: str = "line", encoding: str = "utf-8") -> list[str]:
    """The documents of every source, in order; a source with no text, or that cannot be read, is an error.

    ``unit`` ``"line"``: each non-empty line of a file is a document (empty and undecodable lines are skipped
    and logged); ``"file"``: each file is one document (it must decode as a whole).
    """
    if unit not in TEXT_UNITS:
        raise ValueError(f"text unit must be one of {TEXT_UNITS}, got {unit!r}")
    if not sources:
        raise ValueError("no text given: pass --text FILE (one or more)")
    documents: list[str] = []
    for source in sources:
        path = Path(source)
        if _is_saved_dataset(path):
            docs = _read_saved_dataset(path)
        elif path.is_file():
            docs = _read_file(path, unit, encoding)
        else:
            raise FileNotFoundError(f"text source not found: {path} (a text file or a datasets folder)")
        if not docs:
            raise ValueError(f"{path} holds no text: it is empty or every line is blank")
        documents += docs
    return documents


def _read_file(path: Path, unit: str, encoding: str) -> list[str]:
    data = path.read_bytes()
    if unit == "file":
        try:
            text = data.decode(encoding).strip()
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not {encoding} text ({err}); pass --encoding") from None
        return [text] if text else []
    lines, empty, bad = decode_lines(split_lines(data), encoding)
    if bad and not lines:
        raise ValueError(f"{path} is not {encoding} text: none of its {bad} non-empty lines decode; pass --encoding")
    if bad:
        log.warning("%s: skipped %d lines that are not %s", path, bad, encoding)
    return [text for _, text in lines]


def _read_saved_dataset(path: Path) -> list[str]:
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as err:  # datasets raises several types for a folder it cannot read
        raise ValueError(f"{path} is not a readable datasets folder: {err}") from err
    if hasattr(ds, "keys"):  # a DatasetDict: every split's rows, in order
        parts = [ds[k] for k in ds]
    else:
        parts = [ds]
    if any("text" not in p.column_names for p in parts):
        raise ValueError(f"{path}: a datasets folder for language modelling needs a 'text' column")
    return [t.strip() for p in parts for t in p["text"] if isinstance(t, str) and t.strip()]


def split_documents(
    documents: Sequence[str], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Documents shuffled by ``seed`` and cut into train / validation / test (whole documents, at least one each)."""
    if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction and test_fraction must be in (0, 1) with sum < 1, got {val_fraction}, {test_fraction}"
        )
    if len(documents) < 3:
        raise ValueError(
            f"language-model data needs at least 3 documents (train, validation, test), got {len(documents)}"
        )
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(test_fraction * len(order)))
    n_val = max(1, round(val_fraction * len(order)))
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return {
        name: [documents[i] for i in sorted(idx)]
        for name, idx in (("train", train), ("validation", val), ("test", test))
    }


def pack_windows(token_lists: Sequence[Sequence[int]], context_length: int, eos_id: int = EOS_ID) -> list[list[int]]:
    """Each token list followed by ``eos_id``, concatenated, cut into windows of ``context_length + 1`` tokens.

    Consecutive windows share one token (the last target of one is the first input of the next); the last
    window may be shorter. Every token but the first is a target exactly once.
    """
    if context_length < 1:
        raise ValueError(f"context_length must be >= 1, got {context_length}")
    stream = [t for ids in token_lists for t in (*ids, eos_id)]
    return [stream[i : i + context_length + 1] for i in range(0, max(len(stream) - 1, 0), context_length)]


def collate_windows(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Inputs ``[B, T]`` (padded with ``<|padding|>``) and targets ``[B, T]`` (padded with :data:`IGNORE_INDEX`)."""
    windows = [e["input_ids"] for e in examples]
    inputs, lengths = pad_right([w[:-1] for w in windows], PAD_ID)
    targets, _ = pad_right([w[1:] for w in windows], IGNORE_INDEX)
    return {"input_ids": inputs, "targets": targets, "lengths": lengths}


@dataclass
class TextStats:
    """Sizes of one split: documents, tokens, windows, UTF-8 bytes."""

    documents: int
    tokens: int
    windows: int
    bytes: int


class TextDataModule(SplitsDataModule):
    collate_fn = staticmethod(collate_windows)
    columns = ("input_ids",)

    """A language-model corpus as train / validation / test loaders of packed token windows.

    Args:
        text: text sources: files, or folders written by ``datasets`` ``save_to_disk`` with a ``text`` column.
        text_unit: ``line`` (each line a document) or ``file`` (each file one document).
        encoding: encoding of the text files.
        context_length: tokens per training window.
        seed: seed of the document split and the training order.
        tokenizer: the 20B_tokenizer.json (default: data/, else ../shared/tokenizer/).
        batch_size: windows per training batch.
        eval_batch_size: windows per evaluation batch (default: batch_size).
        val_fraction: share of the documents held out for validation.
        test_fraction: share of the documents held out for test.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        text: list[str] | None = None,
        text_unit: str = "line",
        encoding: str = "utf-8",
        context_length: int = 128,
        seed: int = 0,
        tokenizer: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        num_workers: int = 0,
    ):
        super().__init__()
        if not text:
            raise ValueError("language modelling needs text: pass --text FILE (one or more files or saved datasets)")
        if text_unit not in TEXT_UNITS:
            raise ValueError(f"text_unit must be one of {TEXT_UNITS}, got {text_unit!r}")
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        self.sources = [str(Path(t).resolve()) for t in text]
        self.text_unit, self.encoding, self.context_length = text_unit, encoding, context_length
        self.seed = seed
        self.tokenizer_path = find_tokenizer(tokenizer)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.num_workers = num_workers
        self.splits = None
        self.stats: dict[str, TextStats] = {}
        self.documents: dict[str, list[str]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        from datasets import Dataset, DatasetDict

        documents = read_documents(self.sources, self.text_unit, self.encoding)
        self.documents = split_documents(documents, self.val_fraction, self.test_fraction, self.seed)
        tokenizer = load_tokenizer(self.tokenizer_path)
        splits = {}
        for name, docs in self.documents.items():
            ids = [e.ids for e in tokenizer.encode_batch(docs)]
            windows = pack_windows(ids, self.context_length)
            self.stats[name] = TextStats(
                len(docs), sum(map(len, ids)) + len(ids), len(windows), sum(len(d.encode("utf-8")) for d in docs)
            )
            splits[name] = Dataset.from_dict({"input_ids": windows, "length": [len(w) for w in windows]})
        self.splits = DatasetDict(splits)
        log.info(
            "text splits: %s", ", ".join(f"{k} {v.documents} docs / {v.tokens} tokens" for k, v in self.stats.items())
        )

    def fingerprints(self) -> dict[str, str]:
        """:func:`~.splits.split_fingerprint` of every split's documents."""
        return {name: split_fingerprint(docs) for name, docs in self.documents.items()}

    @property
    def eval_sets(self) -> list[str]:
        """The splits evaluated after each epoch, in dataloader order."""
        return ["validation"]
