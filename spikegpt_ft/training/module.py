"""What every spikegpt-ft LightningModule shares: exact resume, the optimiser, the per-epoch history.

:class:`SpikeGPTModule` holds the model and its :class:`~.optimization.Optimization`; the classifier
(``classifier.py``) and the language model (``language_model.py``) add their loss and metrics. A run resumed
from ``last.ckpt`` continues exactly: the training loader restores its place in the data order
(:class:`~spikegpt_ft.data.ResumableLoader`) and every training batch draws its random numbers (dropout) from
a seed of (seed, epoch, batch, rank) alone, not from wherever the RNG stood.
"""

from __future__ import annotations

import time

import lightning as L
import numpy as np
import torch
from torchmetrics import MeanMetric

from ..adapters import SparsityMeter
from ..model import SpikeGPT, check_token_ids
from .optimization import Optimization


class RunningMean(MeanMetric):
    """torchmetrics' weighted mean (same states, so checkpoints carry it alike), updated without a host read.

    ``MeanMetric.update`` looks for NaNs with a Python ``if`` on a device tensor: on a GPU, a sync that
    stalls every training step (and its ``nan_strategy="disable"`` drops the weights in torchmetrics 1.9).
    A NaN training loss shows up in the epoch's mean here instead of being dropped from it.
    """

    def update(self, value: torch.Tensor, weight: torch.Tensor) -> None:
        """Add ``value`` (a loss) with ``weight`` (its batch's size), both tensors on the metric's device."""
        self.mean_value += (value * weight).sum()
        self.weight += weight.sum()


class SpikeGPTModule(L.LightningModule):
    """A SpikeGPT being trained: optimiser and schedule, seeded batches, resumable loader, history.

    Args:
        model: the network (with or without adapters).
        optimization: AdamW and its schedule.
        seed: the run's seed (each training batch's random draws derive from it).
        drop_frozen_from_checkpoint: leave the frozen parameters out of Lightning checkpoints (an official
            base that ``--base`` supplies again on resume).
    """

    def __init__(
        self,
        model: SpikeGPT,
        optimization: Optimization | None = None,
        seed: int = 0,
        drop_frozen_from_checkpoint: bool = False,
    ):
        super().__init__()
        self.model = model
        self.optimization = optimization or Optimization()
        self.seed = seed
        self.drop_frozen = drop_frozen_from_checkpoint
        self.strict_loading = not drop_frozen_from_checkpoint
        self.meter = SparsityMeter(model)
        self.train_loss = RunningMean()
        self.train_loss.persistent(True)  # a run resumed mid-epoch keeps the loss of the batches before it
        self.history: list[dict] = []
        self._loader_state: dict | None = None  # the train loader's place, from the checkpoint resumed
        self._epoch_start = 0.0
        self._train_time = 0.0

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # the token ids' range is checked here, on the host, so that no step waits on the GPU for it
        check_token_ids(batch["input_ids"], self.model.config.vocab_size)
        return batch

    # --- training
    def on_train_start(self) -> None:
        self._epoch_start = time.perf_counter()  # for an epoch resumed in the middle (no epoch start)
        if self._loader_state is not None:
            # Lightning keeps the loader's state_dict in its checkpoint too, but when configure_optimizers
            # asks for estimated_stepping_batches (as here) it makes the train loader before the checkpoint's
            # loop states are restored and never hands that state back. So the module carries it and
            # restores it here, before the loader's first batch (it draws its order lazily).
            self.trainer.train_dataloader.load_state_dict(self._loader_state)
            self._loader_state = None

    def on_train_epoch_start(self) -> None:
        # not called for the epoch a run resumed in the middle of: its loss so far came with the checkpoint
        self.train_loss.reset()
        self._epoch_start = time.perf_counter()
        self._train_time = 0.0

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # The random draws of a batch (dropout) depend on (seed, epoch, batch, rank) only, so that a run
        # resumed from any checkpoint repeats them; SeedSequence keeps the streams of different batches apart.
        key = [self.seed, self.current_epoch, batch_idx, self.global_rank]
        torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1))

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self._train_time = time.perf_counter() - self._epoch_start

    def log_train_loss(self, loss: torch.Tensor, weight: int | torch.Tensor, batch_size: int) -> None:
        """Add a training batch's loss (weighted by ``weight``, its examples or tokens) to the epoch's mean.

        ``weight`` may be a tensor on the loss's device (never read on the host); ``batch_size`` is the batch's
        number of sequences, for Lightning's log.
        """
        if not isinstance(weight, torch.Tensor):
            weight = loss.new_full((), weight)  # a fill, not a host-to-device copy
        self.train_loss.update(loss.detach(), weight.to(loss.dtype))
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)

    def epoch_row(self) -> dict:
        """The start of this epoch's history row: epoch, training loss and time, learning rate."""
        train_loss = self.train_loss.compute() if self.train_loss.update_count else torch.tensor(float("nan"))
        optimizers = self.trainer.optimizers
        return {
            "epoch": self.current_epoch,
            "train_loss": float(train_loss),
            "epoch_time_s": self._train_time,
            "lr": float(optimizers[0].param_groups[0]["lr"]) if optimizers else None,
        }

    def add_history(self, row: dict) -> None:
        """Keep ``row`` as this epoch's history (replacing a row of the same epoch, e.g. after a resume)."""
        self.history = [h for h in self.history if h["epoch"] != row["epoch"]] + [row]

    # --- sparsity
    def sparsity(self) -> dict[str, float]:
        """The adapters' sparsity over what the meter recorded, summed over all ranks (empty without gates)."""
        if not len(self.meter):
            return {}
        reduce = None
        if self._trainer is not None and self.trainer.world_size > 1:
            # each rank counted its share: sum the counts (not the fractions; the shares differ in size)
            def reduce(counts: torch.Tensor) -> torch.Tensor:
                return self.trainer.strategy.reduce(counts, reduce_op="sum")

        return self.meter.result(reduce)

    # --- optimisation
    def configure_optimizers(self):
        return self.optimization.build(self.model, self.trainer.estimated_stepping_batches)

    # --- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["spikegpt_ft"] = {"history": self.history}
        loader = self.trainer.train_dataloader if self._trainer is not None else None
        if hasattr(loader, "state_dict"):
            checkpoint["spikegpt_ft"]["train_loader"] = loader.state_dict()
        if self.drop_frozen:
            frozen = {f"model.{n}" for n, p in self.model.named_parameters() if not p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("spikegpt_ft")
        if extra is None:
            raise ValueError("this Lightning checkpoint was not written by spikegpt-ft training")
        if self._trainer is None or self.trainer.state.fn == "fit":
            # resuming: the epochs run so far; testing the best checkpoint keeps the full history
            self.history = list(extra.get("history", []))
            self._loader_state = extra.get("train_loader")
