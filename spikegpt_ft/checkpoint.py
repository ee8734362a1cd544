"""Run checkpoints: what a training run leaves in its directory, and loading a trained classifier back.

A run directory (``runs/<task>-<adapter>-seed<N>``) holds:

* ``run_config.json`` — how to rebuild the classifier: task, labels, adapter and its config, base
  (official path or ``scratch:<preset>``), base fingerprint, model config, tokenizer, max length, seed;
* ``model.safetensors`` — the whole classifier (full fine-tuning, and any run on a scratch base, whose
  frozen random base exists nowhere else), with the run config in its metadata;
* ``adapter.safetensors`` — adapter and head weights (adapter runs), written by
  :func:`spikegpt_ft.adapters.save_adapters` with the run config in its extra metadata; for an
  official base this is all that is saved, and the base comes from ``--base`` (checked by fingerprint);
* ``last.ckpt`` / ``best.ckpt`` (Lightning, resumable), ``metrics.json``, ``logs/``.

:func:`load_classifier` is the one entry point for inference: it takes a run directory or one of the
two weight files. Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch

from . import adapters as ad
from .files import atomic_save_safetensors, atomic_write_json
from .model import SpikeGPT, SpikeGPTConfig, load_model

RUN_CONFIG = "run_config.json"
MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapter.safetensors"
RUN_FORMAT = "spikegpt-ft-run"
CLASSIFIER_FORMAT = "spikegpt-ft-classifier"
RUN_VERSION = 1


def export_run(model: SpikeGPT, run_dir: str | Path, run_config: Mapping) -> list[Path]:
    """Write the trained classifier's weights and ``run_config.json`` into ``run_dir``; returns the files.

    ``run_config`` must hold at least ``task``, ``labels``, ``adapter``, ``base``; this adds the format
    tag, the model and adapter configs. Adapter runs get ``adapter.safetensors``; full fine-tuning
    and scratch bases get ``model.safetensors`` (the whole classifier).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = dict(run_config)
    cfg.update(format=RUN_FORMAT, version=RUN_VERSION, model_config=asdict(model.config))
    adapter_config = getattr(model, "adapter_config", None)
    cfg["adapter_config"] = adapter_config.to_dict() if adapter_config is not None else None
    cfg["weights"] = []
    is_scratch = str(cfg.get("base", "")).startswith("scratch:")
    if adapter_config is not None:
        cfg["weights"].append(ADAPTER_FILE)
    if adapter_config is None or is_scratch:
        cfg["weights"].append(MODEL_FILE)
    written = []
    meta_json = json.dumps(cfg, default=str)
    if ADAPTER_FILE in cfg["weights"]:
        written.append(ad.save_adapters(model, run_dir / ADAPTER_FILE, extra_metadata={"run_config": meta_json}))
    if MODEL_FILE in cfg["weights"]:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        atomic_save_safetensors(tensors, run_dir / MODEL_FILE, {"format": CLASSIFIER_FORMAT, "run_config": meta_json})
        written.append(run_dir / MODEL_FILE)
    written.append(atomic_write_json(run_dir / RUN_CONFIG, cfg))
    return written


# ----------------------------------------------------------------------------------------------- loading


def _classifier_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as err:  # safetensors has its own error types
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err


def _run_config_of_file(path: Path) -> tuple[dict, str]:
    """The run config stored inside a weight file, and which kind of file it is (``"adapter"``/``"model"``)."""
    meta = _classifier_metadata(path)
    if meta.get("format") == ad.FILE_FORMAT:
        extra = ad.read_adapter_metadata(path)["extra"]
        if "run_config" not in extra:
            raise ValueError(
                f"{path} is an adapter file but was not written by a training run (no run config in its metadata); "
                "load it with spikegpt_ft.adapters.load_adapters onto its base model"
            )
        return json.loads(extra["run_config"]), "adapter"
    if meta.get("format") == CLASSIFIER_FORMAT:
        return json.loads(meta["run_config"]), "model"
    raise ValueError(
        f"{path} is not a spikegpt-ft checkpoint (safetensors format tag {meta.get('format')!r}); expected a run "
        f"directory, its {MODEL_FILE} or its {ADAPTER_FILE}"
    )


def _resolve(path: Path) -> tuple[dict, Path | None, Path | None]:
    """``(run_config, model_file or None, adapter_file or None)`` for a run dir or a weight file."""
    if path.is_dir():
        cfg_path = path / RUN_CONFIG
        if not cfg_path.is_file():
            what = (
                "a training run in progress or interrupted (resume it with --resume)"
                if (path / "last.ckpt").is_file()
                else "not a spikegpt-ft run directory"
            )
            raise FileNotFoundError(f"{path} has no {RUN_CONFIG}: {what}")
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if cfg.get("format") != RUN_FORMAT:
            raise ValueError(f"{cfg_path} is not a spikegpt-ft run config (format {cfg.get('format')!r})")
        model_file = path / MODEL_FILE if MODEL_FILE in cfg.get("weights", []) else None
        adapter_file = path / ADAPTER_FILE if ADAPTER_FILE in cfg.get("weights", []) else None
        for f in (model_file, adapter_file):
            if f is not None and not f.is_file():
                raise FileNotFoundError(f"{f} is missing: the run directory {path} is incomplete")
        return cfg, model_file, adapter_file
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: pass a run directory (runs/<task>-<adapter>-seed<N>)")
    if path.suffix == ".ckpt":
        raise ValueError(
            f"{path} is a Lightning training checkpoint (for --resume); pass its run directory {path.parent} "
            f"or its {MODEL_FILE} / {ADAPTER_FILE}"
        )
    if path.suffix != ".safetensors":
        raise ValueError(f"{path} is not a spikegpt-ft checkpoint: expected a run directory or a .safetensors file")
    cfg, kind = _run_config_of_file(path)
    return cfg, (path if kind == "model" else None), (path if kind == "adapter" else None)


def _attach_from_config(model: SpikeGPT, adapter_config: Mapping) -> None:
    c = ad.AdapterConfig.from_dict(adapter_config)
    ad.attach_adapters(
        model, kind=c.kind, r=c.r, alpha=c.alpha, rslora=c.rslora, dropout=c.dropout,
        v_threshold=c.v_threshold, tau=c.tau, targets=c.targets,
    )  # fmt: skip


def load_classifier(
    path: str | Path,
    base: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[SpikeGPT, dict]:
    """Load a trained classifier (eval mode) from a run directory, its model.safetensors or adapter.safetensors.

    ``base`` is the official SpikeGPT ``.pth`` the adapters were trained on; needed only for adapter runs
    on an official base (default: the path recorded at training time) and checked by fingerprint. For
    full fine-tuning and scratch bases the whole classifier is in ``model.safetensors`` and ``base`` is
    not used.

    Returns ``(model, info)``; ``info`` is the run config: ``task``, ``labels`` (list of names, index =
    class id), ``n_classes``, ``adapter`` (``none``/``lora``/``spikelora``), ``adapter_config``,
    ``base``, ``base_fingerprint``, ``model_config``, ``tokenizer`` (path used in training),
    ``max_length`` (``None`` = no limit), ``pad_id``, ``seed``; plus ``source`` (the weight file loaded).
    Raises ``FileNotFoundError``/``ValueError`` with a clear message for a wrong or incomplete checkpoint.
    """
    path = Path(path)
    cfg, model_file, adapter_file = _resolve(path)
    if model_file is not None:
        from safetensors.torch import load_file

        model = SpikeGPT(SpikeGPTConfig(**cfg["model_config"]))
        if cfg.get("adapter_config"):
            _attach_from_config(model, cfg["adapter_config"])
        try:
            tensors = load_file(str(model_file))
        except Exception as err:  # safetensors has its own error types
            raise ValueError(f"{model_file} is not a readable safetensors file: {err}") from err
        result = model.load_state_dict(tensors, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{model_file} does not fit the model of its run config: missing {result.missing_keys[:6]}, "
                f"unexpected {result.unexpected_keys[:6]}"
            )
        source = model_file
    else:
        assert adapter_file is not None
        base_path = Path(base) if base is not None else (Path(cfg["base_path"]) if cfg.get("base_path") else None)
        if base_path is None or not base_path.is_file():
            from .training import BASE_HELP

            raise FileNotFoundError(
                f"{adapter_file} holds adapters for the official base {cfg.get('base')!r}, which is needed to "
                f"load them and was not found at {base_path}. Pass it with --base (base=...). {BASE_HELP}"
            )
        model = load_model(base_path)
        fingerprint = ad.base_fingerprint(model)
        if fingerprint != cfg.get("base_fingerprint"):
            raise ValueError(
                f"{base_path} is not the base these adapters were trained on (fingerprint {fingerprint[:19]}... vs "
                f"{str(cfg.get('base_fingerprint'))[:19]}... of {cfg.get('base')}); pass that base with --base"
            )
        ad.load_adapters(model, adapter_file)
        source = adapter_file
    info = dict(cfg)
    info["source"] = str(source)
    info.setdefault("n_classes", len(info.get("labels", [])))
    return model.to(device=device, dtype=dtype).eval(), info
