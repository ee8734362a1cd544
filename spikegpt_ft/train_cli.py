"""``python train.py``: fine-tune SpikeGPT on Subj, MR, SST-2 or SST-5, fully or with LoRA / SpikeLoRA.

Options are parsed by jsonargparse: defaults here < the YAML given by ``--config`` (when none is
given, ``configs/<task>-<adapter>.yaml``) < the command line. Each seed gets its own run directory
holding ``metrics.json``, ``run_config.json``, the exported weights, Lightning's ``last.ckpt`` /
``best.ckpt`` and CSV logs; see :mod:`spikegpt_ft.checkpoint`.

Examples::

    python train.py --adapter spikelora --task subj
    python train.py --config configs/quickstart.yaml --adapter lora
    python train.py --adapter none --task sst2 --base scratch --model configs/model/small.yaml --seeds 0,1,2,3,4
    python train.py --adapter spikelora --task subj --resume          # continue an interrupted run
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, Namespace

from .data import REPO_ROOT, TASKS
from .training import ADAPTERS, DEFAULT_BASE

log = logging.getLogger("spikegpt_ft.train")

CONFIG_DIR = REPO_ROOT / "configs"
#: Steps between progress-bar refreshes. The bar shows the training loss, which it reads from the
#: device (on a GPU, a host sync), so it refreshes every few steps rather than after each one.
PROGRESS_BAR_REFRESH_STEPS = 10


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="train.py",
        description="Fine-tune SpikeGPT for sentence classification (full, LoRA or SpikeLoRA) with Lightning.",
        env_prefix="SPIKEGPT_FT",
        default_env=False,
    )
    p.add_argument("--config", action=ActionConfigFile, help="YAML of options (default configs/<task>-<adapter>.yaml)")
    g = p.add_argument_group("what to train")
    g.add_argument("--task", type=str, choices=list(TASKS), required=True, help="the task")
    g.add_argument("--adapter", type=str, choices=list(ADAPTERS), default="spikelora", help="none = full fine-tuning")
    g.add_argument(
        "--base", type=str, default=str(DEFAULT_BASE), help="official SpikeGPT .pth, or 'scratch' (see --model)"
    )
    g.add_argument("--model", type=str, default="configs/model/small.yaml", help="size preset YAML for --base scratch")
    g.add_argument("--seed", type=int, default=0, help="seed of the split, the initialisation and the data order")
    g.add_argument("--seeds", type=str | None, default=None, help="several seeds, e.g. 0,1,2,3,4 (one run each)")
    g.add_argument(
        "--output-dir", type=str | None, default=None, help="run directory (default runs/<task>-<adapter>-seed<N>)"
    )
    g.add_argument(
        "--resume", action=ActionYesNo, default=False, help="continue the run in --output-dir from last.ckpt"
    )
    g.add_argument("--overwrite", action=ActionYesNo, default=False, help="start afresh in a directory holding a run")
    d = p.add_argument_group("data")
    d.add_argument(
        "--data-dir", type=str | None, default=None, help="task files (default data/<task>, ../shared/data/<task>)"
    )
    d.add_argument(
        "--tokenizer", type=str | None, default=None, help="20B_tokenizer.json (default data/, ../shared/tokenizer/)"
    )
    d.add_argument("--max-length", type=int | None, default=None, help="cut longer texts (default: never truncate)")
    d.add_argument("--max-train-samples", type=int | None, default=None, help="stratified subset of train")
    d.add_argument("--max-eval-samples", type=int | None, default=None, help="stratified subsets of validation/test")
    d.add_argument("--val-fraction", type=float, default=0.1, help="share of train held out for validation (Subj, MR)")
    d.add_argument("--test-fraction", type=float, default=0.1, help="test share of Subj / MR")
    d.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=10)
    o.add_argument("--batch-size", type=int, default=32)
    o.add_argument("--eval-batch-size", type=int | None, default=None)
    o.add_argument("--lr", type=float, default=5e-4)
    o.add_argument("--weight-decay", type=float, default=0.01)
    o.add_argument("--warmup-ratio", type=float, default=0.06)
    o.add_argument("--schedule", type=str, choices=["linear", "cosine", "constant"], default="linear")
    o.add_argument("--grad-clip", type=float, default=1.0)
    o.add_argument("--accumulate-grad-batches", type=int, default=1)
    a = p.add_argument_group("adapters")
    a.add_argument("--rank", type=int, default=8, help="adapter rank r")
    a.add_argument("--alpha", type=float | None, default=None, help="LoRA alpha (default sqrt(rank))")
    a.add_argument("--rslora", type=bool, default=True, help="scale by alpha/sqrt(r) (rsLoRA)")
    a.add_argument("--lora-dropout", type=float, default=0.0)
    a.add_argument("--v-threshold", type=float, default=0.1, help="SpikeLoRA LIF threshold")
    a.add_argument("--tau", type=float, default=2.0, help="SpikeLoRA LIF time constant")
    a.add_argument("--targets", type=list[str] | None, default=None, help="module patterns (default: all 7 per block)")
    h = p.add_argument_group("hardware")
    h.add_argument("--accelerator", type=str, default="auto")
    h.add_argument("--devices", type=str, default="auto", help="number of devices, a list, or auto")
    h.add_argument("--strategy", type=str, default="auto", help="auto, ddp, ddp_spawn, ...")
    h.add_argument("--precision", type=str, default="auto", help="auto = bf16-mixed on a bf16 GPU, else 32-true")
    h.add_argument("--progress-bar", type=bool, default=True, help="true or false")
    h.add_argument("--log-every-n-steps", type=int, default=20)
    return p


def parse_args(argv: list[str]) -> Namespace:
    """Parse ``argv``; with no ``--config``, ``configs/<task>-<adapter>.yaml`` (if present) supplies defaults."""
    parser = build_parser()
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        first = parser.parse_args(argv)
        auto = CONFIG_DIR / f"{first.task}-{first.adapter}.yaml"
        if auto.is_file():
            argv = ["--config", str(auto), *argv]
    return parser.parse_args(argv)


def _norm(ns: Namespace) -> dict:
    return {k.replace("-", "_"): v for k, v in ns.as_dict().items() if k != "config"}


def _seeds(cfg: dict) -> list[int]:
    if cfg["seeds"] is None:
        return [cfg["seed"]]
    try:
        seeds = [int(s) for s in str(cfg["seeds"]).replace(" ", "").split(",") if s != ""]
    except ValueError:
        raise SystemExit(f"train.py: error: --seeds takes integers separated by commas, got {cfg['seeds']!r}") from None
    if not seeds:
        raise SystemExit("train.py: error: --seeds is empty")
    return seeds


def run_dir_for(cfg: dict, seed: int, n_seeds: int) -> Path:
    if cfg["output_dir"] is None:
        return REPO_ROOT / "runs" / f"{cfg['task']}-{cfg['adapter']}-seed{seed}"
    out = cfg["output_dir"]
    if "{" in out:
        return Path(out.format(task=cfg["task"], adapter=cfg["adapter"], seed=seed))
    return Path(out) / f"seed{seed}" if n_seeds > 1 else Path(out)


def _precision(cfg: dict) -> str:
    import torch

    if cfg["precision"] != "auto":
        return cfg["precision"]
    if cfg["accelerator"] in ("auto", "gpu", "cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def _devices(value: str):
    if value == "auto":
        return "auto"
    if value.startswith("["):
        return json.loads(value)
    try:
        return int(value)
    except ValueError:
        return value


def run_one(cfg: dict, seed: int, run_dir: Path) -> dict | None:
    """Train, select, test and export one seed into ``run_dir``; returns the metrics (rank 0) or None."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger

    from . import adapters as ad
    from .bench import peak_memory_mb
    from .checkpoint import export_run
    from .data import PAD_ID, TaskDataModule, get_task
    from .files import atomic_write_json
    from .training import SpikeGPTClassifier, build_classifier

    spec = get_task(cfg["task"])
    last = run_dir / "last.ckpt"
    if cfg["resume"]:
        if not last.is_file():
            raise SystemExit(f"train.py: error: --resume: no {last} to continue (run directory {run_dir})")
    elif (last.is_file() or (run_dir / "metrics.json").is_file()) and not cfg["overwrite"]:
        raise SystemExit(
            f"train.py: error: {run_dir} already holds a run; pass --resume to continue it, --overwrite to start "
            "afresh there, or another --output-dir"
        )
    elif cfg["overwrite"]:
        for name in ("last.ckpt", "best.ckpt", "metrics.json"):
            (run_dir / name).unlink(missing_ok=True)

    L.seed_everything(seed, workers=True)
    started = time.perf_counter()
    dm = TaskDataModule(
        cfg["task"], seed=seed, data_dir=cfg["data_dir"], tokenizer=cfg["tokenizer"], batch_size=cfg["batch_size"],
        eval_batch_size=cfg["eval_batch_size"], max_length=cfg["max_length"],
        max_train_samples=cfg["max_train_samples"], max_eval_samples=cfg["max_eval_samples"],
        val_fraction=cfg["val_fraction"], test_fraction=cfg["test_fraction"], num_workers=cfg["num_workers"],
    )  # fmt: skip
    dm.setup("fit")
    adapter_options = {
        "r": cfg["rank"], "alpha": cfg["alpha"], "rslora": cfg["rslora"], "dropout": cfg["lora_dropout"],
        "v_threshold": cfg["v_threshold"], "tau": cfg["tau"], "targets": cfg["targets"],
    }  # fmt: skip
    model, base_info = build_classifier(cfg["base"], spec.n_classes, cfg["adapter"], cfg["model"], adapter_options)
    trainable, total = ad.count_parameters(model)
    official_adapters = cfg["adapter"] != "none" and base_info["base_path"] is not None
    module = SpikeGPTClassifier(
        model, spec.n_classes, cfg["adapter"], lr=cfg["lr"], weight_decay=cfg["weight_decay"],
        warmup_ratio=cfg["warmup_ratio"], schedule=cfg["schedule"], drop_frozen_from_checkpoint=official_adapters,
        seed=seed,
    )  # fmt: skip

    loggers = [CSVLogger(str(run_dir), name="logs")]
    try:
        import tensorboard  # noqa: F401
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(str(run_dir), name="tb"))
    except ImportError:
        pass
    ckpt_cb = ModelCheckpoint(
        dirpath=str(run_dir), filename="best", monitor="val_accuracy", mode="max", save_top_k=1, save_last=True,
        enable_version_counter=False, auto_insert_metric_name=False,
    )  # fmt: skip
    bar = [TQDMProgressBar(refresh_rate=PROGRESS_BAR_REFRESH_STEPS)] if cfg["progress_bar"] else []
    precision = _precision(cfg)
    trainer = L.Trainer(
        default_root_dir=str(run_dir), max_epochs=cfg["epochs"], accelerator=cfg["accelerator"],
        devices=_devices(cfg["devices"]), strategy=cfg["strategy"], precision=precision,
        accumulate_grad_batches=cfg["accumulate_grad_batches"], gradient_clip_val=cfg["grad_clip"] or None,
        logger=loggers, num_sanity_val_steps=0, use_distributed_sampler=False,
        callbacks=[ckpt_cb, *bar],
        enable_progress_bar=cfg["progress_bar"], log_every_n_steps=cfg["log_every_n_steps"],
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm, ckpt_path=str(last) if cfg["resume"] else None)
    fit_time = time.perf_counter() - started
    # test the best weights (the ones with the highest validation accuracy)
    trainer.test(module, datamodule=dm, ckpt_path="best" if ckpt_cb.best_model_path else None, verbose=False)
    if not trainer.is_global_zero:
        return None

    run_config = {
        "task": cfg["task"],
        "labels": list(spec.labels),
        "n_classes": spec.n_classes,
        "adapter": cfg["adapter"],
        "base": base_info["base"],
        "base_path": base_info["base_path"],
        "preset": base_info["preset"],
        "base_fingerprint": base_info["base_fingerprint"],
        "tokenizer": str(dm.tokenizer_path),
        "max_length": cfg["max_length"],
        "pad_id": PAD_ID,
        "seed": seed,
    }
    export_run(module.model, run_dir, run_config)
    history = module.history
    best = max(history, key=lambda h: h["val_accuracy"]) if history else {}
    peak, peak_kind = peak_memory_mb(module.device)
    test = module.test_results
    metrics = {
        "task": cfg["task"],
        "adapter": cfg["adapter"],
        "seed": seed,
        "base": base_info["base"],
        "test_accuracy": test.get("test_accuracy"),
        "test_loss": test.get("test_loss"),
        "val_accuracy": best.get("val_accuracy"),
        "best_epoch": best.get("epoch"),
        "sparsity": test.get("test_sparsity"),
        "sparsity_per_module": test.get("test_sparsity_per_module"),
        "val_sparsity": best.get("sparsity"),
        "trainable_params": trainable,
        "total_params": total,
        "epoch_time_s": sum(h["epoch_time_s"] for h in history) / len(history) if history else None,
        "peak_memory_mb": peak,
        "peak_memory_kind": peak_kind,
        "wall_time_s": fit_time,
        "precision": precision,
        "world_size": trainer.world_size,
        "splits": {k: len(v) for k, v in dm.splits.items()},
        "skipped_lines": {"empty": dm.read_report.empty, "undecodable": dm.read_report.undecodable},
        "truncated": dm.token_report.truncated,
        "longest_tokens": dm.token_report.longest,
        "epochs": history,
        "config": {k: v for k, v in cfg.items() if k not in ("seeds",)} | {"seed": seed},
        "command": " ".join(sys.argv),
    }
    atomic_write_json(run_dir / "metrics.json", metrics)
    sp = "" if metrics["sparsity"] is None else f", sparsity {metrics['sparsity']:.3f}"
    print(
        f"[{cfg['task']}/{cfg['adapter']}/seed {seed}] test accuracy {metrics['test_accuracy']:.4f}, best val "
        f"{metrics['val_accuracy']:.4f}{sp}, {metrics['epoch_time_s']:.1f} s/epoch -> {run_dir}",
        flush=True,
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``train.py``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = _norm(parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets

    datasets.disable_progress_bars()
    seeds = _seeds(cfg)
    try:
        for seed in seeds:
            run_one(cfg, seed, run_dir_for(cfg, seed, len(seeds)))
    except (FileNotFoundError, ValueError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    return 0
