"""The four SpikeGPT NLU tasks: what each is made of and where its original files are.

Formats (``shared/README.md``):

* Subj (``subj.subjective`` / ``subj.objective``) and MR (``rt-polarity.pos`` / ``rt-polarity.neg``): one
  sentence per line, one file per label, **Latin-1** (both hold bytes that are not UTF-8). No official
  test split (see :mod:`.splits`).
* SST-2 / SST-5 (``stsa.{binary,fine}.{train,dev,test}``): ``LABEL sentence`` per line, UTF-8, with their
  own train/dev/test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..paths import candidates


@dataclass(frozen=True)
class TaskSpec:
    """What a task is made of: its label names and files, and how they are laid out."""

    name: str
    title: str
    labels: tuple[str, ...]
    #: ``"per_label"``: one file per label (``files[i]`` holds label ``i``, split by seed);
    #: ``"labelled"``: ``LABEL text`` lines, one file per split (``files`` in train/dev/test order).
    layout: str
    files: tuple[str, ...]
    encoding: str

    @property
    def n_classes(self) -> int:
        return len(self.labels)


TASKS: dict[str, TaskSpec] = {
    "subj": TaskSpec(
        "subj",
        "Subjectivity (Pang & Lee 2004)",
        ("objective", "subjective"),
        "per_label",
        ("subj.objective", "subj.subjective"),
        "latin-1",
    ),
    "mr": TaskSpec(
        "mr",
        "MR / rt-polarity (Pang & Lee 2005)",
        ("negative", "positive"),
        "per_label",
        ("rt-polarity.neg", "rt-polarity.pos"),
        "latin-1",
    ),
    "sst2": TaskSpec(
        "sst2",
        "SST-2 (Socher et al. 2013)",
        ("negative", "positive"),
        "labelled",
        ("stsa.binary.train", "stsa.binary.dev", "stsa.binary.test"),
        "utf-8",
    ),
    "sst5": TaskSpec(
        "sst5",
        "SST-5 fine-grained (Socher et al. 2013)",
        ("very negative", "negative", "neutral", "positive", "very positive"),
        "labelled",
        ("stsa.fine.train", "stsa.fine.dev", "stsa.fine.test"),
        "utf-8",
    ),
}


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of ``name``; an unknown name gets an error listing the choices."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}") from None


def data_dir_candidates(task: str) -> list[Path]:
    """Where the files of ``task`` are looked for when no ``--data_dir`` is given, in order."""
    return candidates(f"data/{task}")


def find_data_dir(task: str, data_dir: str | Path | None = None) -> Path:
    """The folder holding ``task``'s files: ``data_dir`` if given, else the first of :func:`data_dir_candidates`.

    Raises ``FileNotFoundError`` naming every folder searched and the files expected there.
    """
    spec = get_task(task)
    searched = [Path(data_dir)] if data_dir is not None else data_dir_candidates(task)
    for folder in searched:
        if all((folder / f).is_file() for f in spec.files):
            return folder.resolve()
    looked = "; ".join(f"{c} (missing: {', '.join(f for f in spec.files if not (c / f).is_file())})" for c in searched)
    raise FileNotFoundError(
        f"data for task {task!r} not found. Looked in: {looked}. Expected the original files "
        f"{', '.join(spec.files)}; put them in data/{task}/ or pass --data_dir DIR."
    )
