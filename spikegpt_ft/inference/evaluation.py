"""A trained run evaluated on its own test split, rebuilt from its run config and checked by fingerprint.

A classifier is scored in recurrent and parallel mode (the two must agree); a language model gets its
loss, perplexity and bits per byte in both modes (equal to 1e-4 relative). The split is rebuilt with the
options recorded at training time; when they are missing (a run of the first format) or the rebuilt
split's fingerprint differs (changed data files), evaluation is refused: another split could hold the
run's training texts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import (
    TextDataModule,
    build_splits,
    load_tokenizer,
    split_fingerprint,
    stratified_subset,
    token_byte_lengths,
)
from ..data.text import IGNORE_INDEX, collate_windows
from ..model import SpikeGPT
from ..runs import RunConfig
from .decoding import step_function
from .stepping import evaluating


def _check_recorded(config: RunConfig, source: str) -> dict:
    if not config.data or not config.split_fingerprints or "test" not in config.split_fingerprints:
        raise ValueError(
            f"{source} does not record the options of its data split (a run of an older format): its test split "
            "cannot be rebuilt, and another split could hold its training texts; retrain it to evaluate it"
        )
    return dict(config.data)


def _check_fingerprint(config: RunConfig, fingerprint: str, source: str) -> None:
    if fingerprint != config.split_fingerprints["test"]:
        raise ValueError(
            f"the test split rebuilt for {source} differs from the one it was trained with (fingerprint "
            f"{fingerprint[:19]}... vs {config.split_fingerprints['test'][:19]}...): the data files changed; "
            "evaluate with the run's own data (--data-dir)"
        )


def test_split(
    config: RunConfig, source: str, data_dir: str | Path | None = None, max_samples: int | None = None
) -> tuple[list[str], list[int]]:
    """The texts and labels of a classification run's test split, exactly as at training time.

    ``data_dir`` points at the task's files when they moved; ``max_samples`` takes a stratified subset after
    the check.
    """
    data = _check_recorded(config, source)
    splits, _ = build_splits(
        config.task,
        config.seed,
        data_dir or data.get("data_dir"),
        test_fraction=data["test_fraction"],
        val_fraction=data["val_fraction"],
        max_train_samples=data.get("max_train_samples"),
        max_eval_samples=data.get("max_eval_samples"),
    )
    test = splits["test"]
    _check_fingerprint(config, split_fingerprint(test["text"], test["label"]), source)
    test = stratified_subset(test, max_samples, config.seed)
    return list(test["text"]), list(test["label"])


@dataclass(frozen=True)
class Perplexity:
    """A language model's figures on a set of windows in one mode."""

    mode: str
    loss: float
    ppl: float
    bpb: float
    tokens: int


def lm_test_windows(config: RunConfig, source: str, max_windows: int | None = None) -> list[list[int]]:
    """The token windows of a language-model run's test split, exactly as at training time."""
    data = _check_recorded(config, source)
    dm = TextDataModule(
        text=data["text"],
        text_unit=data["text_unit"],
        encoding=data["encoding"],
        context_length=data["context_length"],
        seed=config.seed,
        tokenizer=config.tokenizer if Path(config.tokenizer).is_file() else None,
        val_fraction=data["val_fraction"],
        test_fraction=data["test_fraction"],
    )
    dm.setup("test")
    _check_fingerprint(config, dm.fingerprints()["test"], source)
    windows = list(dm.splits["test"]["input_ids"])
    return windows[:max_windows] if max_windows is not None else windows


def perplexity(
    model: SpikeGPT, windows: list[list[int]], byte_lengths: torch.Tensor, mode: str, batch_size: int = 16
) -> Perplexity:
    """Loss (nats per token), perplexity and bits per byte of ``model`` on ``windows`` in ``mode``.

    ``parallel`` runs each batch of windows in one pass; ``recurrent`` feeds the same windows one token per
    step (``model.step``, compiled on the CPU where it applies), from a fresh state per window, as the training
    windows were seen.
    """
    device = model.emb.weight.device
    byte_lengths = byte_lengths.to(device)
    nats, tokens, spelled = 0.0, 0, 0
    with evaluating(model):
        for start in range(0, len(windows), batch_size):
            batch = collate_windows([{"input_ids": w} for w in windows[start : start + batch_size]])
            ids, targets = batch["input_ids"].to(device), batch["targets"].to(device)
            if mode == "parallel":
                logits = model(ids)
            else:
                state, steps, step = model.init_state(ids.shape[0]), [], step_function(model, ids.shape[0])
                for t in range(ids.shape[1]):
                    step_logits, state = step(ids[:, t], state)
                    steps.append(step_logits)
                logits = torch.stack(steps, dim=1)
            nats += float(
                F.cross_entropy(
                    logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                )
            )
            real = targets != IGNORE_INDEX
            tokens += int(real.sum())
            spelled += int(byte_lengths[targets.clamp(min=0)][real].sum())
    loss = nats / tokens
    return Perplexity(mode, loss, math.exp(loss), nats / math.log(2) / spelled if spelled else math.nan, tokens)


def lm_byte_lengths(config: RunConfig, model: SpikeGPT, tokenizer_path: str | None = None) -> torch.Tensor:
    """Bytes per token id for bits per byte, from the run's tokenizer (or ``tokenizer_path``)."""
    return token_byte_lengths(load_tokenizer(tokenizer_path or config.tokenizer), model.config.vocab_size)
