"""Batches: right padding, length-bucketed resumable sampling, and the DataLoader that combines them.

Batches are right-padded with ``<|padding|>`` and carry each sequence's length, so that a classifier reads
its logits at the last real token: SpikeGPT is causal (token shift, WKV and the LIF neurons only look
back), so padding after a sequence cannot change that read-out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from .tokenizer import PAD_ID


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T_max]`` int64 of ``seqs`` right-padded with ``pad_id``, and their lengths ``[B]``."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.full((len(seqs), int(lengths.max()) if len(seqs) else 0), pad_id, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return ids, lengths


def collate(examples: Sequence[dict], pad_id: int = PAD_ID) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` to the longest in the batch; returns ids, lengths, mask and labels."""
    ids, lengths = pad_right([e["input_ids"] for e in examples], pad_id)
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


def make_loader(
    dataset,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    collate_fn: Callable[[Sequence[dict]], dict] = collate,
    columns: Sequence[str] = ("input_ids", "label"),
) -> DataLoader:
    """A DataLoader of length-bucketed batches over a tokenised split (resumable when shuffled).

    ``dataset`` (a ``datasets.Dataset``) needs a ``length`` column; ``columns`` are what ``collate_fn`` gets of
    each row (default: right-padded classification batches).
    """
    sampler = BucketBatchSampler(dataset["length"], batch_size, shuffle=shuffle, seed=seed)
    return (ResumableLoader if shuffle else DataLoader)(
        dataset.select_columns(list(columns)),
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        # its own generator: making an iterator then draws no number from the global RNG, which
        # drives dropout, so a resumed run (whose iterator is made at a different moment) draws the same
        generator=torch.Generator().manual_seed(seed),
    )


class SplitsDataModule(L.LightningDataModule):
    """Loaders over ``self.splits`` (set by ``setup``): shuffled training batches, ordered evaluation ones.

    A subclass sets ``splits``, ``eval_sets``, ``batch_size``, ``eval_batch_size``, ``seed`` and
    ``num_workers``, and, for other rows than classification's, ``collate_fn`` and ``columns``.
    """

    collate_fn: Callable[[Sequence[dict]], dict] = staticmethod(collate)
    columns: Sequence[str] = ("input_ids", "label")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        size = self.batch_size if shuffle else self.eval_batch_size
        splits, workers = self.splits, self.num_workers
        return make_loader(splits[split], size, shuffle, self.seed, workers, self.collate_fn, self.columns)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(name, False) for name in self.eval_sets]

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
