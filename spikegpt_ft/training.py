"""Fine-tuning SpikeGPT as a sentence classifier with Lightning: the model, its base, loss and metrics.

:func:`build_classifier` makes the network (an official base checkpoint or a fresh model of a size
preset, a class head, optional LoRA / SpikeLoRA adapters); :class:`SpikeGPTClassifier` trains it.
The classifier reads the logits at each sequence's last real token of a right-padded batch (SpikeGPT
is causal, so padding after it cannot change them) and tells the adapters which tokens are real, so
that SpikeLoRA's sparsity counts real tokens only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from . import adapters as ad
from .data import REPO_ROOT
from .model import SpikeGPT, SpikeGPTConfig, check_token_ids, load_model

#: The vocabulary of the GPT-NeoX-20B tokenizer as SpikeGPT uses it.
VOCAB_SIZE = 50277

#: Where an official base is expected when ``--base`` is not given.
DEFAULT_BASE = REPO_ROOT / "checkpoints" / "SpikeGPT-216M.pth"

BASE_HELP = (
    "The official SpikeGPT-216M weights are on Hugging Face, repository ridger/SpikeGPT-OpenWebText-216M "
    "(https://huggingface.co/ridger/SpikeGPT-OpenWebText-216M); download its .pth file to "
    "checkpoints/SpikeGPT-216M.pth or pass --base PATH/TO/FILE.pth. Without it, train from scratch: "
    "--base scratch --model configs/model/tiny.yaml (or small.yaml, 216m.yaml)."
)

ADAPTERS = ("none", "lora", "spikelora")


# ----------------------------------------------------------------------------------------------- model


def read_preset(path: str | Path) -> dict:
    """A model-size preset (``n_layer``, ``n_embd``, optional ``ffn_hidden`` and ``vocab_size``) from YAML."""
    path = Path(path)
    if not path.is_file() and not path.is_absolute() and (REPO_ROOT / path).is_file():
        path = REPO_ROOT / path
    if not path.is_file():
        raise FileNotFoundError(f"model preset {path} not found; presets live in {REPO_ROOT / 'configs' / 'model'}")
    preset = yaml.safe_load(path.read_text()) or {}
    for key in ("n_layer", "n_embd"):
        if not isinstance(preset.get(key), int) or preset[key] < 1:
            raise ValueError(f"model preset {path}: {key} must be a positive integer, got {preset.get(key)!r}")
    return {
        "n_layer": preset["n_layer"],
        "n_embd": preset["n_embd"],
        "ffn_hidden": int(preset.get("ffn_hidden") or 4 * preset["n_embd"]),
        "vocab_size": int(preset.get("vocab_size") or VOCAB_SIZE),
        "name": str(preset.get("name") or path.stem),
    }


def init_scratch(model: SpikeGPT) -> SpikeGPT:
    """Initialise a fresh SpikeGPT the RWKV-v4 way (per-channel decay and mix ramps, small embeddings).

    Uses the global torch RNG, so ``lightning.seed_everything`` fixes the result.
    """
    L_, C = model.config.n_layer, model.config.n_embd
    with torch.no_grad():
        model.emb.weight.uniform_(-1e-4, 1e-4).add_(torch.randn_like(model.emb.weight))
        ramp = torch.arange(C, dtype=torch.float32) / max(C - 1, 1)
        for i, block in enumerate(model.blocks):
            r01 = i / max(L_ - 1, 1)  # 0 -> 1 over the layers
            r1_0 = 1.0 - i / L_  # 1 -> ~0
            att, ffn = block.att, block.ffn
            att.time_decay.copy_(-5 + 8 * ramp ** (0.7 + 1.3 * r01))
            zigzag = torch.tensor([(j + 1) % 3 - 1 for j in range(C)], dtype=torch.float32) * 0.5
            att.time_first.copy_(math.log(0.3) + zigzag)
            x = (torch.arange(C, dtype=torch.float32) / C).view(1, 1, C)
            att.time_mix_k.copy_(x**r1_0)
            att.time_mix_v.copy_(x**r1_0 + 0.3 * r01)
            att.time_mix_r.copy_(x ** (0.5 * r1_0))
            ffn.time_mix_k.copy_(x**r1_0)
            ffn.time_mix_r.copy_(x**r1_0)
            for lin in (att.key, att.value, att.receptance, att.output, ffn.key, ffn.receptance, ffn.value):
                torch.nn.init.normal_(lin.weight, 0.0, 2.0 / lin.weight.shape[1] ** 0.5)
    return model


def build_base(base: str | Path, preset: str | Path | None = None) -> tuple[SpikeGPT, dict]:
    """The base language model and a description of it.

    ``base`` is an official ``.pth`` or ``"scratch"`` (then ``preset`` names a size preset YAML and the
    weights are initialised from the current torch seed). Returns ``(model, {"base": "<path>" or
    "scratch:<preset name>", "preset": dict or None, "base_path": str or None})``.
    """
    if str(base) == "scratch":
        if preset is None:
            raise ValueError("--base scratch needs a model size preset: --model configs/model/tiny.yaml")
        p = read_preset(preset)
        config = SpikeGPTConfig(p["vocab_size"], p["n_embd"], p["n_layer"], p["ffn_hidden"], p["vocab_size"])
        model = init_scratch(SpikeGPT(config))
        return model, {"base": f"scratch:{p['name']}", "preset": p, "base_path": None}
    path = Path(base)
    if not path.is_file():
        raise FileNotFoundError(f"no SpikeGPT base checkpoint at {path}. {BASE_HELP}")
    model = load_model(path)
    return model, {"base": str(path.resolve()), "preset": None, "base_path": str(path.resolve())}


def build_classifier(
    base: str | Path,
    n_classes: int,
    adapter: str = "none",
    preset: str | Path | None = None,
    adapter_options: Mapping | None = None,
) -> tuple[SpikeGPT, dict]:
    """Base + fresh ``n_classes`` head (+ adapters unless ``adapter == "none"``, full fine-tuning)."""
    if adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {adapter!r}; choose one of: {', '.join(ADAPTERS)}")
    model, info = build_base(base, preset)
    info["base_fingerprint"] = ad.base_fingerprint(model)  # of the LM before the head changes (head excluded)
    model.reset_head(n_classes)
    if adapter != "none":
        ad.attach_adapters(model, kind=adapter, **dict(adapter_options or {}))
    model.train()
    return model, info


def last_token_logits(model: SpikeGPT, ids: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor | None = None):
    """Logits ``[B, n_classes]`` at each sequence's last real token of a right-padded batch.

    ``mask`` ``[B, T]`` (real tokens) goes to the adapters' sparsity count when the model has adapters.
    The ids are not range-checked here: :class:`SpikeGPTClassifier` checks each batch on the host.
    """
    has_adapters = getattr(model, "adapter_config", None) is not None
    if has_adapters:
        ad.set_token_mask(model, mask)
    try:
        logits = model(ids, check_ids=False)  # checked on the host by the classifier's on_before_batch_transfer
    finally:
        if has_adapters:
            ad.set_token_mask(model, None)
    return logits[torch.arange(ids.shape[0], device=ids.device), lengths.to(ids.device) - 1]


# ----------------------------------------------------------------------------------------------- module


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


class SpikeGPTClassifier(L.LightningModule):
    """A SpikeGPT classifier (fully fine-tuned or with adapters) with AdamW and warm-up + linear decay.

    Logged per epoch: ``train_loss_epoch``, ``val_loss``, ``val_accuracy``, ``gen_gap`` (validation
    minus training loss) and, with adapters, ``sparsity`` (mean) and ``sparsity/<module>`` measured on
    the validation pass; at test time ``test_loss``, ``test_accuracy``, ``test_sparsity``.
    :attr:`history` keeps one dict per epoch and travels in the Lightning checkpoint. A run resumed from
    ``last.ckpt`` continues exactly: the training loader restores its place in the data order
    (:class:`~spikegpt_ft.data.ResumableLoader`) and every training batch draws its random numbers
    (dropout) from a seed of (seed, epoch, batch, rank) alone, not from wherever the RNG stood.
    """

    def __init__(
        self,
        model: SpikeGPT,
        n_classes: int,
        adapter: str = "none",
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.06,
        schedule: str = "linear",
        drop_frozen_from_checkpoint: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.adapter = adapter
        self.has_adapters = adapter != "none"
        self.drop_frozen = drop_frozen_from_checkpoint
        # the frozen official base is not written into Lightning checkpoints; it comes from --base
        self.strict_loading = not drop_frozen_from_checkpoint
        self.train_loss = RunningMean()
        self.train_loss.persistent(True)  # a run resumed mid-epoch keeps the loss of the batches before it
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_acc = MulticlassAccuracy(n_classes, average="micro")
        self.test_acc = MulticlassAccuracy(n_classes, average="micro")
        self.history: list[dict] = []
        self._loader_state: dict | None = None  # the train loader's place, from the checkpoint resumed
        self.test_results: dict = {}
        self._epoch_start = 0.0
        self._train_time = 0.0

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return last_token_logits(self.model, batch["input_ids"], batch["lengths"], batch.get("mask"))

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
            # restores it here, after the restore and before the loader's first batch (it draws its order
            # lazily); loading the same state twice changes nothing.
            self.trainer.train_dataloader.load_state_dict(self._loader_state)
            self._loader_state = None

    def on_train_epoch_start(self) -> None:
        # not called for the epoch a run resumed in the middle of: its loss so far came with the checkpoint
        self.train_loss.reset()
        self._epoch_start = time.perf_counter()
        self._train_time = 0.0

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # The random draws of a batch (dropout) depend on (seed, epoch, batch, rank) only, so that a run
        # resumed from any checkpoint repeats them whatever the RNG drew while restoring; SeedSequence
        # keeps the streams of different batches apart.
        key = [self.hparams.seed, self.current_epoch, batch_idx, self.global_rank]
        torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1))

    def training_step(self, batch, batch_idx):
        logits = self(batch)
        loss = F.cross_entropy(logits.float(), batch["labels"])
        self.train_loss.update(loss.detach(), loss.new_full((), batch["labels"].numel()))  # a fill, not a copy
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch["labels"].numel())
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self._train_time = time.perf_counter() - self._epoch_start

    # --- evaluation
    def _eval_step(self, batch, loss_metric, acc_metric):
        logits = self(batch)
        loss = F.cross_entropy(logits.float(), batch["labels"], reduction="mean")
        loss_metric.update(loss, weight=batch["labels"].numel())
        acc_metric.update(logits.argmax(-1), batch["labels"])

    def on_validation_epoch_start(self) -> None:
        if self.has_adapters:
            ad.reset_sparsity(self.model)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_loss, self.val_acc)

    def _sparsity(self) -> dict[str, float]:
        if not self.has_adapters:
            return {}
        if self.trainer.world_size > 1:
            # each rank counted the zeros and tokens of its share: sum the counts (not the fractions, the
            # shares hold different numbers of tokens), so that every rank reports the whole set's figure
            modules = list(ad.adapter_modules(self.model).values())
            counts = torch.stack([torch.stack([m.sparsity_zeros, m.sparsity_total]) for m in modules]).double()
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
            for m, (zeros, total) in zip(modules, counts, strict=True):
                m.sparsity_zeros.copy_(zeros)
                m.sparsity_total.copy_(total)
        return ad.sparsity(self.model)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.val_loss.reset()
            self.val_acc.reset()
            return
        val_loss, val_acc = self.val_loss.compute(), self.val_acc.compute()
        self.val_loss.reset()
        self.val_acc.reset()
        train_loss = self.train_loss.compute() if self.train_loss.update_count else torch.tensor(float("nan"))
        row = {
            "epoch": self.current_epoch,
            "train_loss": float(train_loss),
            "val_loss": float(val_loss),
            "val_accuracy": float(val_acc),
            "gen_gap": float(val_loss - train_loss),
            "epoch_time_s": self._train_time,
            "lr": float(self.trainer.optimizers[0].param_groups[0]["lr"]) if self.trainer.optimizers else None,
        }
        logs = {k: row[k] for k in ("train_loss", "val_loss", "gen_gap", "epoch_time_s")}
        logs["train_loss_epoch"] = logs.pop("train_loss")
        sp = self._sparsity()
        if sp:
            row["sparsity"] = sp["mean"]
            row["sparsity_per_module"] = sp
            logs["sparsity"] = sp["mean"]
            logs.update({f"sparsity/{k}": v for k, v in sp.items() if k != "mean"})
        # the values are already reduced over ranks (torchmetrics); sync_dist keeps every rank's logs equal
        self.log_dict({k: torch.tensor(float(v)) for k, v in logs.items()}, sync_dist=True)
        self.log("val_accuracy", val_acc, prog_bar=True, sync_dist=True)
        self.history = [h for h in self.history if h["epoch"] != row["epoch"]] + [row]

    def on_test_epoch_start(self) -> None:
        if self.has_adapters:
            ad.reset_sparsity(self.model)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_loss, self.test_acc)

    def on_test_epoch_end(self) -> None:
        loss, acc = self.test_loss.compute(), self.test_acc.compute()
        self.test_loss.reset()
        self.test_acc.reset()
        res = {"test_loss": float(loss), "test_accuracy": float(acc)}
        sp = self._sparsity()
        if sp:
            res["test_sparsity"] = sp["mean"]
            res["test_sparsity_per_module"] = sp
        self.test_results = res
        self.log_dict({k: torch.tensor(v) for k, v in res.items() if not isinstance(v, dict)}, sync_dist=True)

    # --- optimisation
    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for _, p in self.model.named_parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = min(total - 1, max(1, round(hp.warmup_ratio * total))) if hp.warmup_ratio > 0 else 0
        sched = torch.optim.lr_scheduler
        if hp.schedule == "cosine":
            decay_sched = sched.CosineAnnealingLR(optimizer, T_max=max(1, total - warm), eta_min=0.0)
        elif hp.schedule == "linear":
            decay_sched = sched.LinearLR(optimizer, 1.0, 0.0, total_iters=max(1, total - warm))
        elif hp.schedule == "constant":
            decay_sched = sched.ConstantLR(optimizer, 1.0, total_iters=0)
        else:
            raise ValueError(f"unknown schedule {hp.schedule!r}; choose linear, cosine or constant")
        if warm > 0:
            warmup = sched.LinearLR(optimizer, start_factor=1.0 / (warm + 1), end_factor=1.0, total_iters=warm)
            scheduler = sched.SequentialLR(optimizer, [warmup, decay_sched], milestones=[warm])
        else:
            scheduler = decay_sched
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

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
