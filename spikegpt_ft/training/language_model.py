"""SpikeGPT as a language model: next-token loss, perplexity and bits per byte.

This is the objective SpikeGPT was pretrained with; with it the project pretrains its own base on a corpus
(``--task lm --text FILES``), which the classification runs then fine-tune.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.text import IGNORE_INDEX
from ..model import SpikeGPT
from .module import SpikeGPTModule
from .optimization import Optimization


class SpikeGPTLanguageModel(SpikeGPTModule):
    """Next-token prediction over packed windows (``input_ids`` ``[B, T]``, ``targets`` padded with -100).

    Logs per epoch ``val_loss`` (nats per target token), ``val_ppl`` and ``val_bpb`` (bits per UTF-8 byte of
    the text the targets spell, with ``byte_lengths`` from :func:`~spikegpt_ft.data.token_byte_lengths`;
    the end-of-document token counts in the loss and spells no byte), ``tokens_per_s`` of training and, with
    SpikeLoRA, ``sparsity``. ``trainer.test`` gives :attr:`test_results` with the same figures for the test set.

    Args:
        model: the language model (its head spans the vocabulary).
        byte_lengths: ``[vocab_size]`` bytes of text per token id.
        optimization: AdamW and its schedule.
        seed: the run's seed.
        drop_frozen_from_checkpoint: see :class:`~.module.SpikeGPTModule`.
    """

    def __init__(
        self,
        model: SpikeGPT,
        byte_lengths: torch.Tensor,
        optimization: Optimization | None = None,
        seed: int = 0,
        drop_frozen_from_checkpoint: bool = False,
    ):
        super().__init__(model, optimization, seed, drop_frozen_from_checkpoint)
        if byte_lengths.shape != (model.config.vocab_size,):
            raise ValueError(
                f"byte_lengths must have shape [{model.config.vocab_size}], got {tuple(byte_lengths.shape)}"
            )
        self.register_buffer("byte_lengths", byte_lengths.to(torch.int64), persistent=False)
        self.register_buffer("totals", torch.zeros(3, dtype=torch.float64), persistent=False)  # nats, tokens, bytes
        self.test_results: dict = {}
        self.register_buffer("train_tokens", torch.zeros((), dtype=torch.int64), persistent=False)

    def forward(self, batch) -> torch.Tensor:
        """Summed next-token loss (nats) of a batch and the number of its target tokens."""
        logits = self.model(batch["input_ids"], check_ids=False)
        targets = batch["targets"]
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return loss, (targets != IGNORE_INDEX).sum()

    def training_step(self, batch, batch_idx):
        total, n = self(batch)
        loss = total / n.clamp(min=1)
        self.train_tokens += n  # on the device: read once per epoch, never per step (a host sync on a GPU)
        self.log_train_loss(loss, n, batch["input_ids"].shape[0])
        return loss

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.train_tokens.zero_()

    # --- evaluation
    def _evaluate(self, batch) -> None:
        targets = batch["targets"]
        real = targets != IGNORE_INDEX
        with self.meter.recording(real):
            total, n = self(batch)
        spelled = self.byte_lengths[targets.clamp(min=0)][real].sum()
        self.totals += torch.stack([total.double(), n.double(), spelled.double()])

    def _figures(self, prefix: str) -> dict[str, float]:
        totals = self.totals.clone()
        if self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        nats, tokens, spelled = totals.tolist()
        self.totals.zero_()
        loss = nats / tokens if tokens else math.nan
        return {
            f"{prefix}_loss": loss,
            f"{prefix}_ppl": math.exp(loss) if loss < 700 else math.inf,
            f"{prefix}_bpb": nats / math.log(2) / spelled if spelled else math.nan,
        }

    def on_validation_epoch_start(self) -> None:
        self.meter.reset()
        self.totals.zero_()

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._evaluate(batch)

    def on_validation_epoch_end(self) -> None:
        figures = self._figures("val")
        if self.trainer.sanity_checking:
            return
        row = self.epoch_row() | figures
        row["gen_gap"] = row["val_loss"] - row["train_loss"]
        row["tokens_per_s"] = int(self.train_tokens) / row["epoch_time_s"] if row["epoch_time_s"] else None
        logs = {k: v for k, v in row.items() if k not in ("epoch", "lr") and v is not None}
        logs["train_loss_epoch"] = logs.pop("train_loss")
        sparsity = self.sparsity()
        if sparsity:
            row["sparsity"], row["sparsity_per_module"] = sparsity["mean"], sparsity
            logs["sparsity"] = sparsity["mean"]
        self.log_dict({k: torch.tensor(float(v)) for k, v in logs.items()}, sync_dist=True, add_dataloader_idx=False)
        self.add_history(row)

    def on_test_epoch_start(self) -> None:
        self.meter.reset()
        self.totals.zero_()

    def test_step(self, batch, batch_idx):
        self._evaluate(batch)

    def on_test_epoch_end(self) -> None:
        results = self._figures("test")
        sparsity = self.sparsity()
        if sparsity:
            results["test_sparsity"], results["test_sparsity_per_module"] = sparsity["mean"], sparsity
        self.test_results = results
        self.log_dict({k: torch.tensor(v) for k, v in results.items() if not isinstance(v, dict)}, sync_dist=True)
