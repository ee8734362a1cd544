"""The four SpikeGPT NLU tasks: reading the original files, splits, tokenisation and batches.

Formats (``shared/README.md``):

* Subj (``subj.subjective`` / ``subj.objective``) and MR (``rt-polarity.pos`` / ``rt-polarity.neg``): one
  sentence per line, one file per label, **Latin-1** (both hold bytes that are not UTF-8). No official
  test split: a stratified 90/10 train/test split per seed, and a stratified 10 % of train for validation.
* SST-2 / SST-5 (``stsa.{binary,fine}.{train,dev,test}``): ``LABEL sentence`` per line, UTF-8; their own
  train/dev/test (dev selects the model, test is reported).

Lines are split on ``\\n`` only (the Latin-1 files contain byte 0x85, which ``str.splitlines`` would
treat as a line break). Empty and undecodable lines are skipped and counted in a :class:`ReadReport`;
a label out of range is an error naming file and line.

Batches are right-padded with the tokenizer's ``<|padding|>`` id and carry each sequence's length, so
that the classifier reads its logits at the last real token: SpikeGPT is causal (token shift, WKV and
the LIF neurons only look back), so padding after a sequence cannot change that read-out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

log = logging.getLogger(__name__)

#: The repository root (``spikegpt_ft/..``); defaults are searched relative to it.
REPO_ROOT = Path(__file__).resolve().parents[1]

#: Id of ``<|padding|>`` in the GPT-NeoX-20B tokenizer.
PAD_ID = 1

TOKENIZER_URL = "https://github.com/ridgerchu/SpikeGPT/blob/master/20B_tokenizer.json"


@dataclass(frozen=True)
class TaskSpec:
    """What a task is made of: its label names and files, and how they are laid out."""

    name: str
    title: str
    labels: tuple[str, ...]
    #: ``"per_label"``: one file per label (``files[i]`` holds label ``i``, split by seed);
    #: ``"labelled"``: ``LABEL text`` lines, one file per split (``files`` keyed train/dev/test order).
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


# ----------------------------------------------------------------------------------------------- paths


def data_dir_candidates(task: str) -> list[Path]:
    """Where the files of ``task`` are looked for when no ``--data-dir`` is given, in order."""
    return [REPO_ROOT / "data" / task, REPO_ROOT.parent / "shared" / "data" / task]


def find_data_dir(task: str, data_dir: str | Path | None = None) -> Path:
    """The folder holding ``task``'s files: ``data_dir`` if given, else ``data/<task>``, else ``../shared/data/<task>``.

    Raises ``FileNotFoundError`` naming every folder searched and the files expected there.
    """
    spec = get_task(task)
    candidates = [Path(data_dir)] if data_dir is not None else data_dir_candidates(task)
    for cand in candidates:
        if all((cand / f).is_file() for f in spec.files):
            return cand
    looked = "; ".join(
        f"{c} (missing: {', '.join(f for f in spec.files if not (c / f).is_file())})" for c in candidates
    )
    raise FileNotFoundError(
        f"data for task {task!r} not found. Looked in: {looked}. Expected the original files "
        f"{', '.join(spec.files)}; put them in data/{task}/ or pass --data-dir DIR."
    )


def tokenizer_candidates() -> list[Path]:
    """Where the GPT-NeoX-20B tokenizer is looked for when no ``--tokenizer`` is given, in order."""
    return [REPO_ROOT / "data" / "20B_tokenizer.json", REPO_ROOT.parent / "shared" / "tokenizer" / "20B_tokenizer.json"]


def find_tokenizer(path: str | Path | None = None) -> Path:
    """The tokenizer file: ``path`` if given, else the first of :func:`tokenizer_candidates` that exists."""
    candidates = [Path(path)] if path is not None else tokenizer_candidates()
    for cand in candidates:
        if cand.is_file():
            return cand.resolve()
    raise FileNotFoundError(
        f"tokenizer not found. Looked for: {', '.join(map(str, candidates))}. SpikeGPT uses the "
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


# ----------------------------------------------------------------------------------------------- reading


@dataclass
class ReadReport:
    """What was skipped while reading, per file: empty lines and lines that did not decode."""

    empty: dict[str, int] = field(default_factory=dict)
    undecodable: dict[str, int] = field(default_factory=dict)
    read: dict[str, int] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(self.empty.values()) + sum(self.undecodable.values())

    def summary(self) -> str:
        parts = [f"{name}: {n} read" for name, n in self.read.items()]
        for name in self.read:
            e, u = self.empty.get(name, 0), self.undecodable.get(name, 0)
            if e or u:
                parts.append(f"{name}: skipped {e} empty and {u} undecodable lines")
        return "; ".join(parts)


def read_lines(path: Path, encoding: str, report: ReadReport) -> list[tuple[int, str]]:
    """The non-empty decoded lines of ``path`` with their 1-based line numbers (split on ``\\n`` only)."""
    raw = path.read_bytes()
    pieces = raw.split(b"\n")
    if pieces and pieces[-1] == b"":
        pieces.pop()  # the newline that ends the last line
    out, empty, bad = [], 0, 0
    for number, piece in enumerate(pieces, start=1):
        try:
            text = piece.decode(encoding).strip()
        except UnicodeDecodeError:
            bad += 1
            continue
        if not text:
            empty += 1
            continue
        out.append((number, text))
    report.read[path.name] = len(out)
    report.empty[path.name] = empty
    report.undecodable[path.name] = bad
    if empty or bad:
        log.warning("%s: skipped %d empty and %d undecodable (%s) lines", path, empty, bad, encoding)
    return out


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
            texts += [t for _, t in lines]
            labels += [label] * len(lines)
        return {"all": (texts, labels)}, report
    splits = {}
    for split, name in zip(("train", "dev", "test"), spec.files, strict=True):
        splits[split] = read_labelled(folder / name, spec.encoding, spec.n_classes, report)
    return splits, report


# ----------------------------------------------------------------------------------------------- splits


def _dataset(texts: Sequence[str], labels: Sequence[int], spec: TaskSpec):
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=list(spec.labels))})
    return Dataset.from_dict({"text": list(texts), "label": list(labels)}, features=features)


def _take(ds, n: int | None, seed: int):
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
    """``datasets.DatasetDict`` with ``train``, ``validation`` and ``test`` (columns ``text``, ``label``).

    Subj and MR: stratified ``test_fraction`` test split, then a stratified ``val_fraction`` of the rest
    for validation, both fixed by ``seed``. SST: train / dev (validation) / test as distributed.
    ``max_*_samples`` take stratified subsets (for quick runs); the report says what was skipped.
    """
    from datasets import DatasetDict

    spec = get_task(task)
    raw, report = read_task(task, data_dir)
    if spec.layout == "per_label":
        full = _dataset(*raw["all"], spec)
        outer = full.train_test_split(test_size=test_fraction, stratify_by_column="label", seed=seed)
        inner = outer["train"].train_test_split(test_size=val_fraction, stratify_by_column="label", seed=seed)
        splits = DatasetDict(train=inner["train"], validation=inner["test"], test=outer["test"])
    else:
        splits = DatasetDict(
            train=_dataset(*raw["train"], spec),
            validation=_dataset(*raw["dev"], spec),
            test=_dataset(*raw["test"], spec),
        )
    splits["train"] = _take(splits["train"], max_train_samples, seed)
    splits["validation"] = _take(splits["validation"], max_eval_samples, seed)
    splits["test"] = _take(splits["test"], max_eval_samples, seed)
    return splits, report


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
                "%s: %d of %d sequences were longer than --max-length %d tokens and were truncated (longest %d)",
                name,
                report.truncated[name],
                len(full),
                max_length,
                report.longest[name],
            )
        if any(n == 0 for n in enc["length"]):
            raise ValueError(f"{name}: a text tokenised to no tokens")
        out[name] = enc.remove_columns(["full_length"])
    return type(splits)(out), report


# ----------------------------------------------------------------------------------------------- batches


def collate(examples: Sequence[dict], pad_id: int = PAD_ID) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` to the longest in the batch; returns ids, lengths, mask and labels."""
    lengths = torch.tensor([len(e["input_ids"]) for e in examples], dtype=torch.long)
    ids = torch.full((len(examples), int(lengths.max())), pad_id, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : lengths[i]] = torch.as_tensor(e["input_ids"], dtype=torch.long)
    mask = torch.arange(ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    return {"input_ids": ids, "lengths": lengths, "mask": mask, "labels": torch.tensor([e["label"] for e in examples])}


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar length (less padding), reproducible per ``(seed, epoch)`` and shared out over ranks.

    Training (``shuffle=True``): the indices are shuffled, cut into pools of ``pool`` batches, each pool
    sorted by length and cut into batches, and the batches shuffled; every rank gets the same number of
    batches (the list is wrapped round to a multiple of the world size). Evaluation (``shuffle=False``):
    batches of sorted lengths, each rank a disjoint share, nothing repeated. Lightning calls
    :meth:`set_epoch`; the order depends on nothing else, so a resumed run sees the same order.
    :meth:`skip` makes the next pass start after the batches an interrupted run already trained on.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool, seed: int = 0, pool: int = 50):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.pool = pool
        self.epoch = 0
        #: batches the next pass leaves out (see :meth:`skip`)
        self.skipping = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the order of ``epoch`` from the next pass on (Lightning calls this before every epoch)."""
        if epoch != self.epoch:
            self.skipping = 0  # a skip belongs to the epoch it was set for
        self.epoch = epoch

    def skip(self, n_batches: int) -> None:
        """Leave out the first ``n_batches`` of the next pass (they were trained on before an interruption)."""
        if not 0 <= n_batches <= len(self):
            raise ValueError(f"cannot skip {n_batches} batches of an epoch of {len(self)}")
        self.skipping = n_batches

    @property
    def sampler(self) -> BucketBatchSampler:
        """Itself: Lightning calls ``set_epoch`` on ``batch_sampler.sampler``."""
        return self

    def _batches(self) -> list[list[int]]:
        n, bs = len(self.lengths), self.batch_size
        if not self.shuffle:
            order = sorted(range(n), key=lambda i: self.lengths[i])
            return [order[i : i + bs] for i in range(0, n, bs)]
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(n, generator=g).tolist()
        batches = []
        step = bs * self.pool
        for start in range(0, n, step):
            chunk = sorted(order[start : start + step], key=lambda i: self.lengths[i])
            batches += [chunk[i : i + bs] for i in range(0, len(chunk), bs)]
        perm = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in perm]

    def _mine(self) -> list[list[int]]:
        batches = self._batches()
        rank, world = _dist_rank_world()
        if world == 1:
            return batches
        if self.shuffle:
            need = math.ceil(len(batches) / world) * world
            batches = batches + batches[: need - len(batches)]
        return batches[rank::world]

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: the order is drawn at the first batch, not when the iterator is made (Lightning
        # makes the first iterator of a fit before its set_epoch; ResumableLoader restores the epoch too)
        skip, self.skipping = self.skipping, 0
        yield from self._mine()[skip:]

    def __len__(self) -> int:
        rank, world = _dist_rank_world()
        total = math.ceil(len(self.lengths) / self.batch_size)
        if world == 1:
            return total
        if self.shuffle:
            return math.ceil(total / world)
        return len(range(rank, total, world))


class ResumableLoader(DataLoader):
    """A DataLoader over a :class:`BucketBatchSampler` that Lightning checkpoints and restores.

    Lightning stores ``state_dict()`` of every training loader that has one in its checkpoint and
    hands it back through ``load_state_dict`` before it makes the loader's first iterator of a resumed
    fit (and before it calls ``set_epoch``). The state is the sampler's epoch and how many batches of it
    were handed out; Lightning does not read ahead of a loader that has a length, so that is how many
    were trained on. Restored, the next pass continues that epoch after them, or, when the epoch was
    finished, starts the next one. Without this, a loader with worker processes, which draws its batch
    indices as soon as its iterator is made, would replay the epoch before the interruption.
    Hand-written because torchdata's StatefulDataLoader, which does this generically, is not a
    dependency, and the state is two integers.
    """

    def __init__(self, dataset, batch_sampler: BucketBatchSampler, **kwargs):
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self._taken = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._taken = self.batch_sampler.skipping
        for batch in super().__iter__():
            self._taken += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Where the training order stands: ``epoch`` and ``batches`` handed out in it (of ``length``)."""
        sampler = self.batch_sampler
        return {"epoch": sampler.epoch, "batches": self._taken, "length": len(sampler), "seed": sampler.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from :meth:`state_dict`'s position; a state of another data set or seed is an error."""
        sampler = self.batch_sampler
        if state.get("length") != len(sampler) or state.get("seed") != sampler.seed:
            raise ValueError(
                f"the checkpoint's training data ({state.get('length')} batches per epoch, seed {state.get('seed')}) "
                f"is not this run's ({len(sampler)} batches, seed {sampler.seed}): resume with the same data options"
            )
        epoch, taken = int(state["epoch"]), int(state["batches"])
        if taken >= len(sampler):
            epoch, taken = epoch + 1, 0
        sampler.set_epoch(epoch)
        sampler.skip(taken)
        self._taken = taken


def make_loader(dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0) -> DataLoader:
    """A DataLoader of right-padded, length-bucketed batches over a tokenised split (resumable when shuffled)."""
    sampler = BucketBatchSampler(dataset["length"], batch_size, shuffle=shuffle, seed=seed)
    columns = dataset.select_columns(["input_ids", "label"])
    return (ResumableLoader if shuffle else DataLoader)(
        columns,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        # its own generator: making an iterator then draws no number from the global RNG, which
        # drives dropout, so a resumed run (whose iterator is made at a different moment) draws the same
        generator=torch.Generator().manual_seed(seed),
    )


class TaskDataModule(L.LightningDataModule):
    """Tokenised, length-bucketed train / validation / test loaders of one task and seed.

    ``setup`` reads and splits the data (deterministic per seed), tokenises it, and logs what was
    skipped or truncated; :attr:`read_report` and :attr:`token_report` keep those figures.
    """

    def __init__(
        self,
        task: str,
        seed: int = 0,
        data_dir: str | None = None,
        tokenizer: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        max_length: int | None = None,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        num_workers: int = 0,
    ):
        super().__init__()
        self.spec = get_task(task)
        self.task, self.seed, self.data_dir = task, seed, data_dir
        self.tokenizer_path = find_tokenizer(tokenizer)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.max_length = max_length
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.num_workers = num_workers
        self.splits = None
        self.read_report: ReadReport | None = None
        self.token_report: TokenizeReport | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        splits, self.read_report = build_splits(
            self.task,
            self.seed,
            self.data_dir,
            self.test_fraction,
            self.val_fraction,
            self.max_train_samples,
            self.max_eval_samples,
        )
        log.info("%s data: %s", self.task, self.read_report.summary())
        tokenizer = load_tokenizer(self.tokenizer_path)
        self.splits, self.token_report = tokenize_splits(splits, tokenizer, self.max_length)
        log.info("%s splits: %s", self.task, ", ".join(f"{k} {len(v)}" for k, v in self.splits.items()))

    def train_dataloader(self) -> DataLoader:
        return make_loader(self.splits["train"], self.batch_size, True, self.seed, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return make_loader(self.splits["validation"], self.eval_batch_size, False, self.seed, self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return make_loader(self.splits["test"], self.eval_batch_size, False, self.seed, self.num_workers)
