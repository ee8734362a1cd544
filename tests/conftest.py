"""Shared test helpers: where ../shared is, and small random SpikeGPT models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spikegpt_ft.model import SpikeGPT, SpikeGPTConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures" / "official_spikegpt"


def tiny_model(
    vocab: int = 97, n_embd: int = 32, n_layer: int = 2, head_out: int | None = None, seed: int = 0
) -> SpikeGPT:
    """A small SpikeGPT with random weights scaled so that its LIFs fire at a realistic rate."""
    torch.manual_seed(seed)
    model = SpikeGPT(SpikeGPTConfig(vocab, n_embd, n_layer, 4 * n_embd, head_out or vocab))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("time_decay"):
                p.uniform_(-3, 1)
            elif name.endswith("time_first"):
                p.uniform_(-1, 1)
            elif "time_mix" in name:
                p.uniform_(0, 1)
            elif p.dim() == 2:
                p.normal_(0, 2.0 / p.shape[1] ** 0.5)
    return model.eval()


@pytest.fixture
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"the shared folder is expected at {SHARED} (tests read data and fixtures from it)")
    return SHARED
