"""The Lightning DataModule of a classification task: tokenised, length-bucketed train / eval loaders."""

from __future__ import annotations

import logging

from .batching import SplitsDataModule
from .reading import ReadReport
from .splits import TokenizeReport, build_splits, split_fingerprint, tokenize_splits
from .tasks import find_data_dir, get_task
from .tokenizer import find_tokenizer, load_tokenizer

log = logging.getLogger(__name__)


class TaskDataModule(SplitsDataModule):
    """One task's splits for one seed, tokenised, as length-bucketed loaders.

    ``setup`` reads and splits the data (deterministic per seed), tokenises it, and logs what was skipped or
    truncated (:attr:`read_report`, :attr:`token_report`). :attr:`eval_sets` are the sets evaluated after
    every training epoch: the validation set when there is one, and the test set too with
    ``test_every_epoch`` (the published protocols print the test accuracy of every epoch).

    Args:
        task: the task, one of subj, mr, sst2, sst5.
        seed: seed of the split (Subj, MR), the subsets and the training order.
        data_dir: folder of the task's original files (default: data/<task>, else ../shared/data/<task>).
        tokenizer: the 20B_tokenizer.json (default: data/, else ../shared/tokenizer/).
        batch_size: training batch size.
        eval_batch_size: evaluation batch size (default: batch_size).
        max_length: cut longer texts to this many tokens (default: never truncate).
        max_train_samples: train on a stratified subset of this many texts.
        max_eval_samples: evaluate on stratified subsets of this many texts.
        val_fraction: share of the training texts held out for validation (Subj, MR; 0 = no validation set).
        test_fraction: test share of Subj / MR.
        test_every_epoch: evaluate the test set after every epoch too (kept in the run's history).
        num_workers: DataLoader worker processes.
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
        test_every_epoch: bool = False,
        num_workers: int = 0,
    ):
        super().__init__()
        self.spec = get_task(task)
        self.task, self.seed = task, seed
        self.data_dir = find_data_dir(task, data_dir)
        self.tokenizer_path = find_tokenizer(tokenizer)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.max_length = max_length
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.test_every_epoch = test_every_epoch
        self.num_workers = num_workers
        self.splits = None
        self.read_report: ReadReport | None = None
        self.token_report: TokenizeReport | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        splits, self.read_report = build_splits(
            self.task, self.seed, self.data_dir, self.test_fraction, self.val_fraction,
            self.max_train_samples, self.max_eval_samples,
        )  # fmt: skip
        log.info("%s data: %s", self.task, self.read_report.summary())
        tokenizer = load_tokenizer(self.tokenizer_path)
        self.splits, self.token_report = tokenize_splits(splits, tokenizer, self.max_length)
        log.info("%s splits: %s", self.task, ", ".join(f"{k} {len(v)}" for k, v in self.splits.items()))

    @property
    def eval_sets(self) -> list[str]:
        """The splits evaluated after each epoch, in dataloader order."""
        sets = ["validation"] if "validation" in self.splits else []
        return sets + (["test"] if self.test_every_epoch or not sets else [])

    def fingerprints(self) -> dict[str, str]:
        """:func:`~.splits.split_fingerprint` of every split."""
        return {name: split_fingerprint(ds["text"], ds["label"]) for name, ds in self.splits.items()}
