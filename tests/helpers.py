"""Helpers shared by the tests: where ../shared is, and small random SpikeGPT models."""

from __future__ import annotations

from pathlib import Path

import torch

from spikegpt_ft.model import SpikeGPT, SpikeGPTConfig, init_random_spiking

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures" / "official_spikegpt"
TOKENIZER = SHARED / "tokenizer" / "20B_tokenizer.json"


def tiny_model(
    vocab: int = 97, n_embd: int = 32, n_layer: int = 2, head_out: int | None = None, seed: int = 0
) -> SpikeGPT:
    """A small SpikeGPT in eval mode with random weights scaled so that its LIFs fire at a realistic rate."""
    torch.manual_seed(seed)
    model = SpikeGPT(SpikeGPTConfig(vocab, n_embd, n_layer, 4 * n_embd, head_out or vocab))
    return init_random_spiking(model, seed).eval()


def export_classifier_run(
    model: SpikeGPT,
    run_dir: Path,
    task: str = "subj",
    labels: tuple[str, ...] = ("objective", "subjective"),
    data_dir: Path | None = None,
    seed: int = 0,
) -> Path:
    """Write ``model`` as a finished classification run (as ``train.py`` leaves one) and return ``run_dir``.

    With ``data_dir`` the run records the task's default split options and its splits' fingerprints, so
    that ``infer.py --evaluate`` can rebuild them.
    """
    from dataclasses import asdict

    from spikegpt_ft.adapters import base_fingerprint
    from spikegpt_ft.data import build_splits, split_fingerprint
    from spikegpt_ft.runs import RunConfig, export_run

    data, fingerprints = None, None
    if data_dir is not None:
        data = {"data_dir": str(data_dir), "test_fraction": 0.1, "val_fraction": 0.1}
        splits, _ = build_splits(task, seed, data_dir, 0.1, 0.1)
        fingerprints = {k: split_fingerprint(v["text"], v["label"]) for k, v in splits.items()}
    config = RunConfig(
        task=task,
        labels=list(labels),
        adapter="none",
        base="scratch:test",
        base_fingerprint=base_fingerprint(model),
        model_config=asdict(model.config),
        tokenizer=str(TOKENIZER),
        seed=seed,
        data=data,
        split_fingerprints=fingerprints,
        n_classes=len(labels),
        weights=["model.safetensors"],
    )
    export_run(model, run_dir, config)
    return run_dir


def toy_split(n: int = 50):
    """A ``datasets.Dataset`` of ``n`` toy examples: ids ``10 + i ...`` of 1 to 8 tokens, alternating labels."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 9, (n,), generator=g).tolist()
    ids = [list(range(10 + i, 10 + i + k)) for i, k in enumerate(lengths)]
    return Dataset.from_dict({"input_ids": ids, "label": [i % 2 for i in range(n)], "length": lengths})
