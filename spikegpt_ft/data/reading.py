"""Reading text files line by line: one reader for task files, language-model corpora and ``infer.py`` input.

Lines are split on ``\\n`` only (the Latin-1 task files contain byte 0x85, which ``str.splitlines`` would
treat as a line break) and stripped. Empty and undecodable lines are skipped and counted; a task file
that holds no text at all, or a label out of range, is an error naming the file (and line).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .tasks import find_data_dir, get_task

log = logging.getLogger(__name__)


@dataclass
class ReadReport:
    """What was read and skipped, per file: lines kept, empty lines and lines that did not decode."""

    read: dict[str, int] = field(default_factory=dict)
    empty: dict[str, int] = field(default_factory=dict)
    undecodable: dict[str, int] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(self.empty.values()) + sum(self.undecodable.values())

    def summary(self) -> str:
        """One line: what was read, and what was skipped where."""
        parts = [f"{name}: {n} read" for name, n in self.read.items()]
        for name in self.read:
            e, u = self.empty.get(name, 0), self.undecodable.get(name, 0)
            if e or u:
                parts.append(f"{name}: skipped {e} empty and {u} undecodable lines")
        return "; ".join(parts)


def decode_lines(raw: Iterable[bytes], encoding: str) -> tuple[list[tuple[int, str]], int, int]:
    """The non-empty decoded, stripped lines of ``raw`` with their 1-based numbers; and the empty and bad counts."""
    texts, empty, bad = [], 0, 0
    for number, line in enumerate(raw, start=1):
        try:
            text = line.decode(encoding).strip()
        except UnicodeDecodeError:
            bad += 1
            continue
        if text:
            texts.append((number, text))
        else:
            empty += 1
    return texts, empty, bad


def split_lines(data: bytes) -> list[bytes]:
    """``data`` cut at ``\\n`` (only), without the empty piece after a final newline."""
    pieces = data.split(b"\n")
    if pieces and pieces[-1] == b"":
        pieces.pop()
    return pieces


def read_lines(path: Path, encoding: str, report: ReadReport | None = None) -> list[tuple[int, str]]:
    """The non-empty decoded lines of ``path`` with their line numbers; skipped lines go to ``report``."""
    lines, empty, bad = decode_lines(split_lines(Path(path).read_bytes()), encoding)
    if report is not None:
        report.read[path.name] = len(lines)
        report.empty[path.name] = empty
        report.undecodable[path.name] = bad
    if empty or bad:
        log.warning("%s: skipped %d empty and %d undecodable (%s) lines", path, empty, bad, encoding)
    return lines


def _require_text(path: Path, lines: list, what: str) -> None:
    if not lines:
        raise ValueError(f"{path} holds no text ({what}): every line is empty or undecodable")


def read_labelled(path: Path, encoding: str, n_classes: int, report: ReadReport) -> tuple[list[str], list[int]]:
    """``LABEL text`` lines; a label that is not an integer in ``[0, n_classes)`` is an error naming file and line."""
    texts, labels = [], []
    for number, line in read_lines(path, encoding, report):
        head, _, text = line.partition(" ")
        try:
            label = int(head)
        except ValueError:
            raise ValueError(f"{path}, line {number}: expected 'LABEL sentence', got {line[:60]!r}") from None
        if not 0 <= label < n_classes:
            raise ValueError(f"{path}, line {number}: label {label} is out of range [0, {n_classes})")
        text = text.strip()
        if not text:
            report.empty[path.name] = report.empty.get(path.name, 0) + 1
            report.read[path.name] -= 1
            continue
        texts.append(text)
        labels.append(label)
    _require_text(path, texts, "a split of labelled sentences")
    return texts, labels


def read_task(
    task: str, data_dir: str | Path | None = None
) -> tuple[dict[str, tuple[list[str], list[int]]], ReadReport]:
    """Read ``task``'s original files: ``{"all": ...}`` (Subj, MR) or ``{"train", "dev", "test"}`` (SST)."""
    spec = get_task(task)
    folder = find_data_dir(task, data_dir)
    report = ReadReport()
    if spec.layout == "per_label":
        texts, labels = [], []
        for label, name in enumerate(spec.files):
            lines = read_lines(folder / name, spec.encoding, report)
            _require_text(folder / name, lines, f"the texts of class {spec.labels[label]!r}")
            texts += [t for _, t in lines]
            labels += [label] * len(lines)
        return {"all": (texts, labels)}, report
    splits = {}
    for split, name in zip(("train", "dev", "test"), spec.files, strict=True):
        splits[split] = read_labelled(folder / name, spec.encoding, spec.n_classes, report)
    return splits, report
