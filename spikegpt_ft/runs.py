"""Run directories: what a training run leaves, written and read through one typed :class:`RunConfig`.

A run directory (``runs/<task>-<adapter>-seed<N>``) holds:

* ``run_config.json`` — a :class:`RunConfig`: objective and task, labels, adapter and its config, protocol,
  base (official file or ``scratch:<preset>:<init>``) and its fingerprint, model config, tokenizer, seed, and
  everything that rebuilds the run's exact data splits, with a fingerprint of each split;
* the weights: ``adapter.safetensors`` (adapter runs: adapters and head, tied to the base by fingerprint),
  ``model.safetensors`` (a whole classifier: full fine-tuning, and any run on a scratch base, whose frozen
  random base exists nowhere else) or ``model.pth`` (a whole language model, in the official format that
  :func:`~spikegpt_ft.model.load_model`, ``--base`` and the official code read);
* ``last.ckpt`` / ``best.ckpt`` (Lightning, for ``--resume``), ``metrics.json``, ``logs/``.

:func:`load_run` is the one entry point for inference: it takes a run directory or one of its weight files.
Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from . import adapters as ad
from .data.tokenizer import find_tokenizer
from .files import atomic_save_safetensors, atomic_write_json, load_safetensors, read_json_object, safetensors_metadata
from .model import SpikeGPT, SpikeGPTConfig, load_model, save_official

RUN_CONFIG = "run_config.json"
MODEL_FILE = "model.safetensors"
LM_FILE = "model.pth"
ADAPTER_FILE = "adapter.safetensors"
RUN_FORMAT = "spikegpt-ft-run"
CLASSIFIER_FORMAT = "spikegpt-ft-classifier"
RUN_VERSION = 2
OBJECTIVES = ("classification", "lm")
WEIGHT_FILES = (ADAPTER_FILE, MODEL_FILE, LM_FILE)


@dataclass(frozen=True)
class RunConfig:
    """How a run was made: enough to rebuild its model and its exact data splits.

    ``data`` holds the data options of the run (classification: ``data_dir``, ``val_fraction``,
    ``test_fraction``, ``max_train_samples``, ``max_eval_samples``, ``max_length``; language modelling:
    ``text``, ``text_unit``, ``encoding``, ``context_length``, ``val_fraction``, ``test_fraction``) and
    ``split_fingerprints`` a hash of each split, so that ``--evaluate`` can check it rebuilt the same test split.
    Files of version 1 (before these fields) still load; they cannot be evaluated.
    """

    task: str
    labels: list[str]
    adapter: str
    base: str
    base_fingerprint: str
    model_config: dict
    tokenizer: str
    seed: int
    objective: str = "classification"
    protocol: str = "default"
    gate: str | None = None
    readout: str = "last_token"
    base_path: str | None = None
    preset: dict | None = None
    adapter_config: dict | None = None
    max_length: int | None = None
    pad_id: int = 1
    data: dict | None = None
    split_fingerprints: dict | None = None
    n_classes: int | None = None
    weights: list[str] = field(default_factory=list)
    format: str = RUN_FORMAT
    version: int = RUN_VERSION

    @property
    def is_lm(self) -> bool:
        """Whether the run trained a language model (else a classifier)."""
        return self.objective == "lm"

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "run config") -> RunConfig:
        """Check every field's type and value; a bad one is a ``ValueError`` naming ``source`` and the field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: a run config must be a JSON object, got {type(data).__name__}")
        if data.get("format") != RUN_FORMAT:
            raise ValueError(f"{source} is not a spikegpt-ft run config (format {data.get('format')!r})")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        missing = [f.name for f in fields(cls) if f.name not in values and _required(f)]
        if missing:
            raise ValueError(f"{source}: missing fields {missing}")
        for name, value in values.items():
            if not _has_type(value, hints[name]):
                raise ValueError(f"{source}: field {name!r} has the wrong type ({value!r}; expected {hints[name]})")
        config = cls(**values)
        if config.objective not in OBJECTIVES:
            raise ValueError(f"{source}: objective must be one of {OBJECTIVES}, got {config.objective!r}")
        if config.adapter not in ("none", *ad.KINDS):
            raise ValueError(f"{source}: unknown adapter {config.adapter!r}")
        bad = [w for w in config.weights if w not in WEIGHT_FILES]
        if bad or not config.weights:
            raise ValueError(f"{source}: field 'weights' must name files among {WEIGHT_FILES}, got {config.weights!r}")
        if not config.is_lm and len(config.labels) != config.model_config.get("head_out"):
            raise ValueError(
                f"{source}: it names {len(config.labels)} labels but its model's head has "
                f"{config.model_config.get('head_out')} outputs"
            )
        return config

    def tokenizer_path(self, override: str | Path | None = None) -> Path:
        """``override``, else the tokenizer recorded at training time, else where training looks for one.

        The last case is a run directory moved to another machine: the same search as ``--tokenizer``'s
        default (``data/``, then ``../shared/tokenizer/``).
        """
        if override is not None:
            return find_tokenizer(override)
        recorded = Path(self.tokenizer)
        return recorded if recorded.is_file() else find_tokenizer(None)

    @classmethod
    def read(cls, path: str | Path) -> RunConfig:
        """Read and check a ``run_config.json``."""
        return cls.from_dict(read_json_object(path, "run config"), str(path))

    def write(self, run_dir: str | Path) -> Path:
        """Write ``run_config.json`` into ``run_dir`` (atomically)."""
        return atomic_write_json(Path(run_dir) / RUN_CONFIG, self.to_dict())


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _has_type(value: object, hint: object) -> bool:
    """Whether ``value`` fits a simple annotation (``str``, ``int``, ``dict``, ``list[str]``, ``X | None``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def export_run(model: SpikeGPT, run_dir: str | Path, config: RunConfig) -> list[Path]:
    """Write the trained model's weights and ``run_config.json`` into ``run_dir``; returns the files written.

    Adapter runs get ``adapter.safetensors`` (plus the whole model when the base is a scratch model); full
    runs get ``model.safetensors`` (a classifier) or ``model.pth`` (a language model, official format).
    """
    run_dir = Path(run_dir)
    adapter_config = getattr(model, "adapter_config", None)
    weights = []
    if adapter_config is not None:
        weights.append(ADAPTER_FILE)
    if adapter_config is None or config.base_path is None:
        weights.append(LM_FILE if config.is_lm and adapter_config is None else MODEL_FILE)
    config = replace(
        config,
        model_config=asdict(model.config),
        adapter_config=adapter_config.to_dict() if adapter_config is not None else None,
        weights=weights,
    )
    meta_json = json.dumps(config.to_dict(), default=str)
    written = []
    if ADAPTER_FILE in weights:
        written.append(ad.save_adapters(model, run_dir / ADAPTER_FILE, extra_metadata={"run_config": meta_json}))
    if MODEL_FILE in weights:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        atomic_save_safetensors(tensors, run_dir / MODEL_FILE, {"format": CLASSIFIER_FORMAT, "run_config": meta_json})
        written.append(run_dir / MODEL_FILE)
    if LM_FILE in weights:
        written.append(save_official(ad.base_state_dict(model), run_dir / LM_FILE))
    written.append(config.write(run_dir))
    return written


def _config_of_file(path: Path) -> tuple[RunConfig, str]:
    """The run config stored inside a weight file, and which kind of file it is."""
    meta = safetensors_metadata(path, "spikegpt-ft weight file")
    if meta.get("format") == ad.FILE_FORMAT:
        extra = ad.read_adapter_metadata(path)["extra"]
        if "run_config" not in extra:
            raise ValueError(
                f"{path} is an adapter file but was not written by a training run (no run config in its metadata); "
                "load it with spikegpt_ft.adapters.load_adapters onto its base model"
            )
        raw, kind = extra["run_config"], ADAPTER_FILE
    elif meta.get("format") == CLASSIFIER_FORMAT:
        raw, kind = meta.get("run_config", ""), MODEL_FILE
    else:
        raise ValueError(
            f"{path} is not a spikegpt-ft checkpoint (safetensors format tag {meta.get('format')!r}); expected a run "
            f"directory, its {MODEL_FILE} or its {ADAPTER_FILE}"
        )
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the run config in its metadata is not valid JSON ({err})") from err
    return RunConfig.from_dict(data, f"the run config in {path}"), kind


def resolve_run(path: str | Path) -> tuple[RunConfig, dict[str, Path]]:
    """The run config of a run directory or weight file, and its weight files by name (all checked to exist)."""
    path = Path(path)
    if path.is_dir():
        cfg_path = path / RUN_CONFIG
        if not cfg_path.is_file():
            what = (
                "a training run in progress or interrupted (resume it with --resume)"
                if (path / "last.ckpt").is_file()
                else "not a spikegpt-ft run directory"
            )
            raise FileNotFoundError(f"{path} has no {RUN_CONFIG}: {what}")
        config = RunConfig.read(cfg_path)
        files = {name: path / name for name in config.weights}
        for f in files.values():
            if not f.is_file():
                raise FileNotFoundError(f"{f} is missing: the run directory {path} is incomplete")
        return config, files
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: pass a run directory (runs/<task>-<adapter>-seed<N>)")
    if path.suffix == ".ckpt":
        raise ValueError(
            f"{path} is a Lightning training checkpoint (for --resume); pass its run directory {path.parent} "
            f"or its {MODEL_FILE} / {ADAPTER_FILE}"
        )
    if path.suffix != ".safetensors":
        raise ValueError(f"{path} is not a spikegpt-ft checkpoint: expected a run directory or a .safetensors file")
    config, kind = _config_of_file(path)
    return config, {kind: path}


def _load_whole(config: RunConfig, file: Path) -> SpikeGPT:
    model = SpikeGPT(SpikeGPTConfig(**config.model_config))
    if config.adapter_config:
        ad.attach(model, ad.AdapterConfig.from_dict(config.adapter_config))
    tensors = load_safetensors(file, "spikegpt-ft classifier file")
    result = model.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{file} does not fit the model of its run config: missing {result.missing_keys[:6]}, "
            f"unexpected {result.unexpected_keys[:6]}"
        )
    return model


def base_help(config: RunConfig) -> str:
    """What to do when an adapter run's base is not where it was."""
    return (
        f"it holds adapters for the base {config.base!r} ({config.base_fingerprint[:19]}...), which was not found "
        f"at {config.base_path}; pass that base with --base PATH"
    )


def load_run(
    path: str | Path,
    base: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[SpikeGPT, RunConfig]:
    """Load a trained model (eval mode) from a run directory or one of its weight files.

    ``base`` is the base ``.pth`` an adapter run was trained on; needed only for adapter runs on a base file
    (default: the path recorded at training time) and checked by fingerprint. Returns ``(model, config)``.
    Raises ``FileNotFoundError``/``ValueError`` with a clear message for a wrong or incomplete checkpoint.
    """
    config, files = resolve_run(path)
    if MODEL_FILE in files:
        model = _load_whole(config, files[MODEL_FILE])
    elif LM_FILE in files:
        model = load_model(files[LM_FILE])
    else:
        base_path = Path(base) if base is not None else (Path(config.base_path) if config.base_path else None)
        if base_path is None or not base_path.is_file():
            raise FileNotFoundError(f"{files[ADAPTER_FILE]}: {base_help(config)}")
        model = load_model(base_path)
        fingerprint = ad.base_fingerprint(model)
        if fingerprint != config.base_fingerprint:
            raise ValueError(
                f"{base_path} is not the base these adapters were trained on (fingerprint {fingerprint[:19]}... vs "
                f"{config.base_fingerprint[:19]}... of {config.base}); pass that base with --base"
            )
        ad.load_adapters(model, files[ADAPTER_FILE])
    return model.to(device=device, dtype=dtype).eval(), config
