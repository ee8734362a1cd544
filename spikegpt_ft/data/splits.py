"""Train / validation / test splits of a task, and their tokenisation.

Subj and MR have no official test split: a stratified ``test_fraction`` of the texts is held out per seed
(90/10 by default, as the SpikeLoRA authors' SpikeGPT experiment does), and a stratified ``val_fraction``
of the rest selects the model (``val_fraction=0``: no validation set, as both published protocols have).
SST-2 / SST-5 use their own train / dev / test files. :func:`split_fingerprint` hashes a split's texts
and labels, so that a run's test split can be recognised when it is rebuilt later.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .reading import read_task
from .tasks import TaskSpec, get_task

log = logging.getLogger(__name__)


def _dataset(texts: Sequence[str], labels: Sequence[int], spec: TaskSpec):
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=list(spec.labels))})
    return Dataset.from_dict({"text": list(texts), "label": list(labels)}, features=features)


def stratified_subset(ds, n: int | None, seed: int):
    """A stratified subset of ``n`` examples (all of ``ds`` when ``n`` is None or not smaller)."""
    if n is None or n >= len(ds):
        return ds
    return ds.train_test_split(train_size=n, stratify_by_column="label", seed=seed)["train"]


def build_splits(
    task: str,
    seed: int,
    data_dir: str | Path | None = None,
    test_fraction: float = 0.1,
    val_fraction: float = 0.1,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
):
    """``datasets.DatasetDict`` with ``train``, ``test`` and (unless there is none) ``validation``.

    Columns ``text`` and ``label``. Subj and MR: stratified ``test_fraction`` test split, then a stratified
    ``val_fraction`` of the rest for validation (none when 0), both fixed by ``seed``. SST: train / dev
    (validation; ``val_fraction`` is not used) / test as distributed. ``max_*_samples`` take stratified
    subsets (for quick runs). Returns the splits and what reading skipped.
    """
    from datasets import DatasetDict

    spec = get_task(task)
    raw, report = read_task(task, data_dir)
    if spec.layout == "per_label":
        full = _dataset(*raw["all"], spec)
        outer = full.train_test_split(test_size=test_fraction, stratify_by_column="label", seed=seed)
        splits = DatasetDict(train=outer["train"], test=outer["test"])
        if val_fraction > 0:
            inner = outer["train"].train_test_split(test_size=val_fraction, stratify_by_column="label", seed=seed)
            splits = DatasetDict(train=inner["train"], validation=inner["test"], test=outer["test"])
    else:
        splits = DatasetDict(
            train=_dataset(*raw["train"], spec),
            validation=_dataset(*raw["dev"], spec),
            test=_dataset(*raw["test"], spec),
        )
    splits["train"] = stratified_subset(splits["train"], max_train_samples, seed)
    for name in ("validation", "test"):
        if name in splits:
            splits[name] = stratified_subset(splits[name], max_eval_samples, seed)
    return splits, report


def split_fingerprint(texts: Sequence[str], labels: Sequence[int] | None = None) -> str:
    """SHA-256 of a split's texts (and labels) in order: equal iff the split is the same."""
    h = hashlib.sha256()
    for i, text in enumerate(texts):
        prefix = "" if labels is None else f"{labels[i]}\t"
        h.update(f"{prefix}{text}\n".encode())
    return "sha256:" + h.hexdigest()


@dataclass
class TokenizeReport:
    """How many sequences were cut to ``max_length`` (never silently: this is logged and recorded)."""

    truncated: dict[str, int] = field(default_factory=dict)
    longest: dict[str, int] = field(default_factory=dict)


def tokenize_splits(splits, tokenizer, max_length: int | None = None):
    """Add ``input_ids`` and ``length`` columns; cut to ``max_length`` tokens only when it is given."""
    report = TokenizeReport()

    def encode(batch):
        ids = [e.ids for e in tokenizer.encode_batch(batch["text"])]
        full = [len(x) for x in ids]
        if max_length is not None:
            ids = [x[:max_length] for x in ids]
        return {"input_ids": ids, "length": [len(x) for x in ids], "full_length": full}

    out = {}
    for name, ds in splits.items():
        enc = ds.map(encode, batched=True, batch_size=1000, desc=f"tokenising {name}", load_from_cache_file=False)
        full = enc["full_length"]
        report.longest[name] = max(full) if full else 0
        report.truncated[name] = sum(n > max_length for n in full) if max_length is not None else 0
        if report.truncated[name]:
            log.warning(
                "%s: %d of %d sequences were longer than max_length %d tokens and were truncated (longest %d)",
                name, report.truncated[name], len(full), max_length, report.longest[name],
            )  # fmt: skip
        if any(n == 0 for n in enc["length"]):
            raise ValueError(f"{name}: a text tokenised to no tokens")
        out[name] = enc.remove_columns(["full_length"])
    return type(splits)(out), report
