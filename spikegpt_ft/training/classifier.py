"""SpikeGPT as a sentence classifier: the read-out, the loss and the per-epoch metrics.

The classifier reads the logits at each sequence's last real token of a right-padded batch (SpikeGPT is
causal, so the padding after it cannot change them). The SpikeLoRA authors' script reads position -1
instead, which in a right-padded batch is a padding position for all but the longest text; that is not
copied (``spikegpt_ft/protocols/spikelora-spikegpt.yaml`` records the departure).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from ..model import SpikeGPT
from .module import SpikeGPTModule
from .optimization import Optimization

#: Prefix of each evaluated split's metrics (``val_accuracy``, ``test_accuracy``).
PREFIX = {"validation": "val", "test": "test"}


def last_token_logits(model: SpikeGPT, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, n_classes]`` at each sequence's last real token of a right-padded batch ``[B, T]``."""
    logits = model(ids, check_ids=False)  # checked on the host before the batch reaches the device
    return logits[torch.arange(ids.shape[0], device=ids.device), lengths.to(ids.device) - 1]


class SplitMetrics(nn.Module):
    """Mean loss and accuracy over one evaluated split."""

    def __init__(self, n_classes: int):
        super().__init__()
        self.loss = MeanMetric()
        self.accuracy = MulticlassAccuracy(n_classes, average="micro")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch's logits and labels."""
        self.loss.update(F.cross_entropy(logits.float(), labels), weight=labels.numel())
        self.accuracy.update(logits.argmax(-1), labels)

    def compute_and_reset(self) -> tuple[float, float]:
        """``(loss, accuracy)`` over what was added, then forget it."""
        loss, accuracy = float(self.loss.compute()), float(self.accuracy.compute())
        self.loss.reset()
        self.accuracy.reset()
        return loss, accuracy


class SpikeGPTClassifier(SpikeGPTModule):
    """A SpikeGPT classifier (fully fine-tuned or with adapters).

    After every epoch it evaluates the data module's ``eval_sets`` (the validation set, and the test set
    under protocols that report it every epoch) and logs ``val_loss``, ``val_accuracy``, ``gen_gap``
    (validation minus training loss), ``test_accuracy`` when the test set is evaluated, and with SpikeLoRA
    ``sparsity`` and ``sparsity/<module>`` measured on the first evaluated set. ``trainer.test`` gives
    :attr:`test_results`. :attr:`history` keeps one row per epoch and travels in the checkpoint.

    Args:
        model: the classifier network (its head has ``n_classes`` outputs).
        n_classes: number of classes.
        optimization: AdamW and its schedule.
        seed: the run's seed.
        drop_frozen_from_checkpoint: see :class:`~.module.SpikeGPTModule`.
    """

    def __init__(
        self,
        model: SpikeGPT,
        n_classes: int,
        optimization: Optimization | None = None,
        seed: int = 0,
        drop_frozen_from_checkpoint: bool = False,
    ):
        super().__init__(model, optimization, seed, drop_frozen_from_checkpoint)
        self.n_classes = n_classes
        self.split_metrics = nn.ModuleDict({name: SplitMetrics(n_classes) for name in PREFIX})
        self.test_results: dict = {}

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Class logits ``[B, n_classes]`` of a right-padded batch."""
        return last_token_logits(self.model, batch["input_ids"], batch["lengths"])

    def _eval_sets(self) -> list[str]:
        datamodule = getattr(self.trainer, "datamodule", None)
        return list(getattr(datamodule, "eval_sets", ["validation"]))

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch).float(), batch["labels"])
        self.log_train_loss(loss, batch["labels"].numel(), batch["labels"].numel())
        return loss

    def _evaluate(self, batch, split: str, measure_sparsity: bool) -> None:
        if measure_sparsity:
            with self.meter.recording(batch.get("mask")):
                logits = self(batch)
        else:
            logits = self(batch)
        self.split_metrics[split].update(logits, batch["labels"])

    # --- after each epoch
    def on_validation_epoch_start(self) -> None:
        self.meter.reset()

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._evaluate(batch, self._eval_sets()[dataloader_idx], dataloader_idx == 0)

    def on_validation_epoch_end(self) -> None:
        results = {}
        for split in self._eval_sets():
            loss, accuracy = self.split_metrics[split].compute_and_reset()
            results[f"{PREFIX[split]}_loss"], results[f"{PREFIX[split]}_accuracy"] = loss, accuracy
        if self.trainer.sanity_checking:
            return
        row = self.epoch_row() | results
        if "val_loss" in row:
            row["gen_gap"] = row["val_loss"] - row["train_loss"]
        logs = {k: v for k, v in row.items() if k not in ("epoch", "lr") and v is not None}
        logs["train_loss_epoch"] = logs.pop("train_loss")
        sparsity = self.sparsity()
        if sparsity:
            row["sparsity"], row["sparsity_per_module"] = sparsity["mean"], sparsity
            logs |= {"sparsity": sparsity["mean"]} | {f"sparsity/{k}": v for k, v in sparsity.items() if k != "mean"}
        # the values are already reduced over ranks (torchmetrics); sync_dist keeps every rank's logs equal
        self.log_dict({k: torch.tensor(float(v)) for k, v in logs.items()}, sync_dist=True, add_dataloader_idx=False)
        self.add_history(row)

    # --- the final test
    def on_test_epoch_start(self) -> None:
        self.meter.reset()

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test", True)

    def on_test_epoch_end(self) -> None:
        loss, accuracy = self.split_metrics["test"].compute_and_reset()
        results = {"test_loss": loss, "test_accuracy": accuracy}
        sparsity = self.sparsity()
        if sparsity:
            results["test_sparsity"], results["test_sparsity_per_module"] = sparsity["mean"], sparsity
        self.test_results = results
        self.log_dict({k: torch.tensor(v) for k, v in results.items() if not isinstance(v, dict)}, sync_dist=True)
