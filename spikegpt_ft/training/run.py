"""A training run from its options to its run directory: check everything, then fit, test and export.

:func:`train` is what ``train.py`` calls. Nothing is created, cleared or written before every option, input
file and checkpoint of every seed has been checked: a run directory that holds a run survives a bad flag.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import adapters as ad
from ..data import TaskDataModule, TextDataModule, get_task, load_tokenizer, token_byte_lengths
from ..files import atomic_write_json
from ..paths import CHECKOUT
from ..runs import RUN_CONFIG, WEIGHT_FILES, RunConfig, export_run
from ..system import peak_memory_mb
from .classifier import SpikeGPTClassifier
from .factory import build_base, build_classifier, build_language_model
from .language_model import SpikeGPTLanguageModel
from .module import SpikeGPTModule
from .optimization import Optimization
from .options import RunOptions, TrainerOptions

log = logging.getLogger(__name__)

#: What a run directory may hold; ``--overwrite`` removes all of it and nothing else.
RUN_ENTRIES = ("last.ckpt", "best.ckpt", "metrics.json", RUN_CONFIG, *WEIGHT_FILES, "logs")
#: Steps between progress-bar refreshes (the bar reads the loss from the device: a host sync on a GPU).
PROGRESS_BAR_REFRESH_STEPS = 10


@dataclass(frozen=True)
class TrainSpec:
    """Everything a training run depends on, resolved from the command line and the protocol.

    ``data`` holds the data module's arguments other than ``task`` and ``seed`` (those of
    :class:`~spikegpt_ft.data.TaskDataModule`, or of :class:`~spikegpt_ft.data.TextDataModule` for ``lm``).
    """

    run: RunOptions
    data: Mapping[str, Any]
    optimization: Optimization
    trainer: TrainerOptions
    adapter: ad.AdapterConfig | None
    command: str = ""


def run_dir_for(options: RunOptions, seed: int, n_seeds: int) -> Path:
    """The run directory of one seed (see :class:`~.options.RunOptions` ``output_dir``)."""
    if options.output_dir is None:
        return CHECKOUT / "runs" / f"{options.task}-{options.adapter}-seed{seed}"
    out = options.output_dir
    if "{" in out:
        return Path(out.format(task=options.task, adapter=options.adapter, seed=seed))
    return Path(out) / f"seed{seed}" if n_seeds > 1 else Path(out)


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything a run leaves."""
    return any((run_dir / name).exists() for name in RUN_ENTRIES)


def check_checkpoint(path: Path) -> None:
    """A ``ValueError`` naming ``path`` unless it is a whole torch checkpoint (a zip archive torch wrote)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} is not a readable training checkpoint (truncated or foreign file: {err})") from err
    if bad is not None or not any(n.endswith("data.pkl") for n in names):
        raise ValueError(f"{path} is not a readable training checkpoint (damaged member {bad or 'data.pkl missing'})")


def check_spec(spec: TrainSpec) -> list[tuple[int, Path]]:
    """Check the options and every seed's run directory; returns ``(seed, run_dir)`` pairs. No side effects."""
    run = spec.run
    if run.resume and run.overwrite:
        raise ValueError("--resume continues a run and --overwrite discards it: pass one of them")
    batch_size = spec.data.get("batch_size", 1)
    eval_batch = spec.data.get("eval_batch_size")
    if batch_size < 1 or (eval_batch is not None and eval_batch < 1):
        raise ValueError(f"batch sizes must be >= 1, got batch_size {batch_size}, eval_batch_size {eval_batch}")
    if not run.is_lm:
        get_task(run.task)
        if (
            run.select == "best"
            and spec.data.get("val_fraction", 0.1) == 0
            and get_task(run.task).layout == "per_label"
        ):
            raise ValueError("--select best needs a validation set: val_fraction is 0 (use --select last)")
    seeds = run.seed_list()
    pairs = [(seed, run_dir_for(run, seed, len(seeds))) for seed in seeds]
    for _, run_dir in pairs:
        if run_dir.exists() and not run_dir.is_dir():
            raise ValueError(f"the output directory {run_dir} is a file")
        last = run_dir / "last.ckpt"
        if run.resume:
            if not last.is_file():
                raise ValueError(f"--resume: no {last} to continue")
            check_checkpoint(last)
        elif holds_run(run_dir) and not run.overwrite:
            raise ValueError(
                f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to start afresh there, "
                "or another --output-dir"
            )
    return pairs


def make_datamodule(spec: TrainSpec, seed: int) -> TaskDataModule | TextDataModule:
    """The run's data module for ``seed``, set up (the data are read, split and tokenised here)."""
    if spec.run.is_lm:
        dm = TextDataModule(seed=seed, **spec.data)
    else:
        dm = TaskDataModule(spec.run.task, seed=seed, **spec.data)
    dm.setup("fit")
    return dm


def make_module(spec: TrainSpec, seed: int, dm) -> tuple[SpikeGPTModule, Any]:
    """The network and its LightningModule for ``seed``, and where its base came from."""
    import lightning as L

    L.seed_everything(seed, workers=True, verbose=False)
    model, base = build_base(spec.run.base, spec.run.model, spec.run.init)
    frozen_official = spec.adapter is not None and base.pretrained
    if spec.run.is_lm:
        model = build_language_model(model, spec.adapter)
        byte_lengths = token_byte_lengths(load_tokenizer(dm.tokenizer_path), model.config.vocab_size)
        module = SpikeGPTLanguageModel(model, byte_lengths, spec.optimization, seed, frozen_official)
    else:
        n_classes = dm.spec.n_classes
        model = build_classifier(model, n_classes, spec.adapter, spec.run.head_bias, spec.run.head_init_std)
        module = SpikeGPTClassifier(model, n_classes, spec.optimization, seed, frozen_official)
    return module, base


def _precision(trainer: TrainerOptions) -> str:
    if trainer.precision != "auto":
        return trainer.precision
    gpu = trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if gpu and torch.cuda.is_bf16_supported() else "32-true"


def _devices(value: str) -> int | str | list[int]:
    if value == "auto":
        return "auto"
    if value.startswith("["):
        return json.loads(value)
    try:
        return int(value)
    except ValueError:
        return value


def clear_run(run_dir: Path) -> None:
    """Remove everything a run leaves in ``run_dir`` (``--overwrite``), and nothing else."""
    for name in RUN_ENTRIES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _run_config(spec: TrainSpec, seed: int, dm, base, model) -> RunConfig:
    data = {
        k: v for k, v in spec.data.items() if k not in ("tokenizer", "num_workers", "batch_size", "eval_batch_size")
    }
    fingerprints = dm.fingerprints()
    if spec.run.is_lm:
        labels, max_length = [], None
        data["text"] = list(dm.sources)
    else:
        labels, max_length = list(dm.spec.labels), spec.data.get("max_length")
        data["data_dir"] = str(dm.data_dir)
    gate = spec.adapter.gate if spec.adapter is not None and spec.adapter.gated else None
    return RunConfig(
        task=spec.run.task,
        labels=labels,
        adapter=spec.run.adapter,
        base=base.base,
        base_fingerprint=base.fingerprint,
        model_config=dataclasses.asdict(model.config),
        tokenizer=str(dm.tokenizer_path),
        seed=seed,
        objective="lm" if spec.run.is_lm else "classification",
        protocol=spec.run.protocol,
        gate=gate,
        base_path=base.base_path,
        preset=base.preset,
        max_length=max_length,
        data=data,
        split_fingerprints=fingerprints,
        n_classes=None if spec.run.is_lm else len(labels),
        weights=["model.pth"],  # replaced by export_run with the files it writes
    )


def fit_one(spec: TrainSpec, seed: int, run_dir: Path) -> dict | None:
    """Train, select, test and export one seed into ``run_dir``; returns its metrics (rank 0) or None."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger

    started = time.perf_counter()
    dm = make_datamodule(spec, seed)
    module, base = make_module(spec, seed, dm)
    run_config = _run_config(spec, seed, dm, base, module.model)
    # the check phase is over: from here on the run directory changes
    if spec.run.overwrite:
        clear_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    monitor, mode = ("val_loss", "min") if spec.run.is_lm else ("val_accuracy", "max")
    select_best = spec.run.select == "best"
    checkpoints = ModelCheckpoint(
        dirpath=str(run_dir), filename="best", monitor=monitor if select_best else None, mode=mode,
        save_top_k=1 if select_best else 0, save_last=True, enable_version_counter=False,
        auto_insert_metric_name=False,
    )  # fmt: skip
    progress = spec.trainer.progress_bar
    precision = _precision(spec.trainer)
    trainer = L.Trainer(
        default_root_dir=str(run_dir), max_epochs=spec.trainer.epochs, accelerator=spec.trainer.accelerator,
        devices=_devices(spec.trainer.devices), strategy=spec.trainer.strategy, precision=precision,
        accumulate_grad_batches=spec.trainer.accumulate_grad_batches,
        gradient_clip_val=spec.trainer.grad_clip or None, logger=[CSVLogger(str(run_dir), name="logs")],
        num_sanity_val_steps=0, use_distributed_sampler=False,
        callbacks=[checkpoints, *([TQDMProgressBar(refresh_rate=PROGRESS_BAR_REFRESH_STEPS)] if progress else [])],
        enable_progress_bar=progress, log_every_n_steps=spec.trainer.log_every_n_steps, enable_model_summary=False,
    )  # fmt: skip
    last = run_dir / "last.ckpt"
    trainer.fit(module, datamodule=dm, ckpt_path=str(last) if spec.run.resume else None)
    fit_time = time.perf_counter() - started
    best = checkpoints.best_model_path if select_best else ""
    trainer.test(module, datamodule=dm, ckpt_path="best" if best else None, verbose=False)
    if not trainer.is_global_zero:
        return None
    export_run(module.model, run_dir, run_config)
    metrics = _metrics(spec, seed, module, dm, base, trainer, precision, fit_time)
    atomic_write_json(run_dir / "metrics.json", metrics)
    print(summary_line(metrics, run_dir), flush=True)
    return metrics


def _selected(history: list[dict], select: str, is_lm: bool) -> dict:
    if not history:
        return {}
    if select == "last":
        return history[-1]
    key = "val_loss" if is_lm else "val_accuracy"
    rows = [h for h in history if key in h]
    return (min if is_lm else max)(rows, key=lambda h: h[key]) if rows else history[-1]


def _metrics(spec: TrainSpec, seed: int, module, dm, base, trainer, precision: str, fit_time: float) -> dict:
    history = module.history
    chosen = _selected(history, spec.run.select, spec.run.is_lm)
    trainable, total = ad.count_parameters(module.model)
    peak, peak_kind = peak_memory_mb(module.device)
    test = module.test_results
    metrics = {
        "task": spec.run.task,
        "adapter": spec.run.adapter,
        "protocol": spec.run.protocol,
        "gate": spec.adapter.gate if spec.adapter is not None and spec.adapter.gated else None,
        "seed": seed,
        "base": base.base,
        "base_fingerprint": base.fingerprint,
        "test_sparsity": None,
        "test_sparsity_per_module": None,
        **test,
        "selected_epoch": chosen.get("epoch"),
        "select": spec.run.select,
        "trainable_params": trainable,
        "total_params": total,
        "epoch_time_s": sum(h["epoch_time_s"] for h in history) / len(history) if history else None,
        "train_time_s": sum(h["epoch_time_s"] for h in history),
        "process_wall_time_s": fit_time,
        "resumed": spec.run.resume,
        "peak_memory_mb": peak,
        "peak_memory_kind": peak_kind,
        "precision": precision,
        "world_size": trainer.world_size,
        "splits": {k: len(v) for k, v in dm.splits.items()},
        "epochs": history,
        "options": {
            "run": dataclasses.asdict(spec.run) | {"seed": seed},
            "data": dict(spec.data),
            "optimization": dataclasses.asdict(spec.optimization),
            "trainer": dataclasses.asdict(spec.trainer),
            "adapter": spec.adapter.to_dict() if spec.adapter is not None else None,
        },
        "command": spec.command,
    }
    if spec.run.is_lm:
        metrics["text"] = {k: dataclasses.asdict(v) for k, v in dm.stats.items()}
    else:
        metrics["val_accuracy"] = chosen.get("val_accuracy")
        metrics["skipped_lines"] = {"empty": dm.read_report.empty, "undecodable": dm.read_report.undecodable}
        metrics["truncated"] = dm.token_report.truncated
        metrics["longest_tokens"] = dm.token_report.longest
    return metrics


def summary_line(metrics: Mapping, run_dir: Path) -> str:
    """One line for the terminal: the run's test figures, sparsity (– without a gate), time per epoch."""
    head = f"[{metrics['task']}/{metrics['adapter']}/seed {metrics['seed']}]"
    sparsity = metrics.get("test_sparsity")
    sparsity_text = "–" if sparsity is None else f"{sparsity:.3f}"
    epoch_time = metrics.get("epoch_time_s")
    timing = "" if epoch_time is None else f", {epoch_time:.1f} s/epoch"
    if metrics["task"] == "lm":
        figures = (
            f"test loss {metrics['test_loss']:.4f}, ppl {metrics['test_ppl']:.2f}, {metrics['test_bpb']:.4f} bits/byte"
        )
    else:
        figures = f"test accuracy {metrics['test_accuracy']:.4f}"
    return f"{head} {figures}, sparsity {sparsity_text}{timing} -> {run_dir}"


def train(spec: TrainSpec) -> list[dict]:
    """Run every seed of ``spec`` (after checking them all); returns the metrics of each (rank 0)."""
    pairs = check_spec(spec)
    results = []
    for seed, run_dir in pairs:
        metrics = fit_one(spec, seed, run_dir)
        if metrics is not None:
            results.append(metrics)
    return results


def command_line() -> str:
    """The command that started this process, for the record."""
    return " ".join(sys.argv)
