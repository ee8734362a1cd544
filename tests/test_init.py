"""The scratch initialisations (spikegpt_ft.model.init): each scheme draws what its docstring says."""

from __future__ import annotations

import math

import pytest
import torch

from spikegpt_ft.model import PRESETS, SCRATCH_INITS, SpikeGPT, init_scratch
from spikegpt_ft.training import RunOptions

MATRICES = ("att.key", "att.value", "att.receptance", "att.output", "ffn.key", "ffn.receptance", "ffn.value")


def _fresh(scheme: str, seed: int = 0) -> SpikeGPT:
    torch.manual_seed(seed)
    return init_scratch(SpikeGPT(PRESETS["tiny"].config()), scheme)


def _matrix(model: SpikeGPT, block: int, name: str) -> torch.Tensor:
    mixer, layer = name.split(".")
    return getattr(getattr(model.blocks[block], mixer), layer).weight.detach().double()


def _is_orthogonal(w: torch.Tensor, gain: float) -> bool:
    """Rows (wide matrices) or columns (tall ones) orthonormal times ``gain``."""
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return torch.allclose(gram, gain**2 * torch.eye(gram.shape[0], dtype=gram.dtype), atol=1e-5 * gain**2)


def test_rwkv_scheme_is_rwkv_v4s_init():
    model = _fresh("rwkv")
    for block in range(model.config.n_layer):
        for name in MATRICES:
            w = _matrix(model, block, name)
            out_features, in_features = w.shape
            if name in ("att.key", "att.receptance", "att.output", "ffn.receptance", "ffn.value"):
                assert torch.count_nonzero(w) == 0, name
            else:
                gain = math.sqrt(out_features / in_features) if out_features > in_features else 1.0
                assert _is_orthogonal(w, gain), name
    vocab, width = model.emb.weight.shape
    assert _is_orthogonal(model.emb.weight.detach().double(), 1e-4 * math.sqrt(vocab))
    assert _is_orthogonal(model.head.weight.detach().double(), 0.5 * math.sqrt(vocab / width))


def test_wide_and_pytorch_schemes_draw_their_scales():
    wide, plain = _fresh("wide"), _fresh("pytorch")
    for name in MATRICES:
        w, p = _matrix(wide, 1, name), _matrix(plain, 1, name)
        fan_in = w.shape[1]
        assert abs(w.std().item() / (2 / math.sqrt(fan_in)) - 1) < 0.1, name
        assert p.abs().max() <= 1 / math.sqrt(fan_in) and p.std().item() < 0.7 / math.sqrt(fan_in), name
    for model in (wide, plain):
        assert abs(model.emb.weight.std().item() - 1) < 0.05


def test_every_scheme_keeps_the_rwkv_time_ramps_and_follows_the_seed():
    for scheme in SCRATCH_INITS:
        a, b, c = _fresh(scheme, 0), _fresh(scheme, 0), _fresh(scheme, 1)
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
        assert not torch.equal(a.blocks[0].att.value.weight, c.blocks[0].att.value.weight)
        decay = a.blocks[0].att.time_decay
        assert decay[0].item() == pytest.approx(-5.0) and decay[-1].item() == pytest.approx(3.0)


def test_unknown_schemes_are_refused():
    with pytest.raises(ValueError, match="must be one of"):
        init_scratch(SpikeGPT(PRESETS["tiny"].config()), "xavier")
    with pytest.raises(ValueError, match="init must be one of"):
        RunOptions(task="subj", init="xavier")
