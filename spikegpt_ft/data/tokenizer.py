"""The GPT-NeoX-20B tokenizer SpikeGPT was trained with, and its special ids."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

from ..paths import candidates

#: Id of ``<|padding|>``: right-pads batches; never read by the model's read-out.
PAD_ID = 1
#: Id of ``<|endoftext|>``: separates documents in language-model training, ends generation.
EOS_ID = 0

TOKENIZER_URL = "https://github.com/ridgerchu/SpikeGPT/blob/master/20B_tokenizer.json"


def tokenizer_candidates() -> list[Path]:
    """Where the tokenizer is looked for when no ``--tokenizer`` is given, in order."""
    return candidates("data/20B_tokenizer.json", "tokenizer/20B_tokenizer.json")


def find_tokenizer(path: str | Path | None = None) -> Path:
    """The tokenizer file: ``path`` if given, else the first of :func:`tokenizer_candidates` that exists."""
    searched = [Path(path)] if path is not None else tokenizer_candidates()
    for cand in searched:
        if cand.is_file():
            return cand.resolve()
    raise FileNotFoundError(
        f"tokenizer not found. Looked for: {', '.join(map(str, searched))}. SpikeGPT uses the "
        f"GPT-NeoX-20B tokenizer (20B_tokenizer.json, from {TOKENIZER_URL}); put it at data/20B_tokenizer.json "
        "or pass --tokenizer PATH."
    )


def load_tokenizer(path: str | Path | None = None):
    """A ``tokenizers.Tokenizer`` for the GPT-NeoX-20B vocabulary (see :func:`find_tokenizer`)."""
    from tokenizers import Tokenizer

    found = find_tokenizer(path)
    try:
        return Tokenizer.from_file(str(found))
    except Exception as err:  # tokenizers raises a bare Exception for a bad file
        raise ValueError(f"{found} is not a tokenizers JSON file: {err}") from err


@cache
def _byte_decoder() -> dict[str, int]:
    # Byte-level BPE (GPT-2, GPT-NeoX) writes each byte of the text as one printable character: the
    # 188 printable Latin-1 bytes as themselves, the other 68 as chr(256 + n) in byte order.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def token_byte_lengths(tokenizer, vocab_size: int) -> torch.Tensor:
    """``[vocab_size]`` int64: how many bytes of text each token id stands for (0 for special tokens).

    For bits per byte: a language model's summed loss over the target tokens, divided by ``ln 2`` times the
    sum of these lengths, is its bits per byte of the text those tokens spell.
    """
    decoder = _byte_decoder()
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    lengths = torch.zeros(vocab_size, dtype=torch.int64)
    for token, index in tokenizer.get_vocab(with_added_tokens=True).items():
        if index < vocab_size and token not in special:
            lengths[index] = sum(1 if ch in decoder else len(ch.encode("utf-8")) for ch in token)
    return lengths
