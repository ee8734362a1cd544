"""SpikeGPT against the official implementation's fixtures, recurrent == parallel, and bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import FIXTURES, tiny_model

from spikegpt_ft import RecurrentState, load_model
from spikegpt_ft.model import SpikeGPTConfig


def load_fixture(name: str):
    expect = torch.load(FIXTURES / f"{name}_expect.pt", map_location="cpu", weights_only=True)
    return load_model(FIXTURES / f"{name}_model.pth"), expect


def spike_rates(model, ids) -> dict[str, float]:
    rates: dict[str, float] = {}
    hooks = [
        node.register_forward_hook(lambda _m, _i, out, name=name: rates.__setitem__(name, out.mean().item()))
        for name, node in model.spiking_neurons().items()
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return rates


@pytest.mark.parametrize("name", ["f1", "f2"])
def test_logits_grads_and_spike_rates_match_official(name):
    model, expect = load_fixture(name)
    assert model.config == SpikeGPTConfig(
        expect["meta"]["vocab_size"],
        expect["meta"]["n_embd"],
        expect["meta"]["n_layer"],
        4 * expect["meta"]["n_embd"],
        expect["meta"]["vocab_size"],
    )
    logits = model(expect["ids"])
    assert (logits - expect["logits"]).abs().max() < 1e-3
    (logits * expect["R"].float()).sum().backward()
    params = dict(model.named_parameters())
    for key, want in expect["grads"].items():
        if key == "emb.weight.rows":
            continue
        got = params[key].grad
        if key == "emb.weight":
            got = got[expect["grads"]["emb.weight.rows"]]
        assert (got - want).abs().max() <= 1e-3 * want.abs().max(), key
    rates = spike_rates(model, expect["ids"])
    assert rates.keys() == expect["meta"]["spike_rates"].keys()
    for key, want in expect["meta"]["spike_rates"].items():
        assert abs(rates[key] - want) < 1e-3, key


def test_bf16_storage_loads_in_any_dtype():
    model_bf16 = load_model(FIXTURES / "f2_model.pth", dtype=torch.bfloat16)
    assert model_bf16.emb.weight.dtype == torch.bfloat16
    sd = torch.load(FIXTURES / "f2_model.pth", map_location="cpu", weights_only=True)
    model = load_model(sd)
    assert torch.equal(model.head.weight, sd["head.weight"].float())


@torch.no_grad()
def test_step_by_step_equals_parallel():
    model = tiny_model()
    ids = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(1))
    parallel = model(ids)
    state = model.init_state(3)
    outs = []
    for t in range(ids.shape[1]):
        logits, state = model.step(ids[:, t], state)
        outs.append(logits)
    assert (torch.stack(outs, 1) - parallel).abs().max() < 1e-4
    # the official fixture model too
    official, expect = load_fixture("f1")
    state = official.init_state(2)
    outs = []
    for t in range(expect["ids"].shape[1]):
        logits, state = official.step(expect["ids"][:, t], state)
        outs.append(logits)
    assert (torch.stack(outs, 1) - expect["logits"]).abs().max() < 1e-3


@torch.no_grad()
@pytest.mark.parametrize("split", [1, 7, 20, 39])
def test_prefill_then_continue_equals_parallel(split):
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(2))
    parallel = model(ids)
    head, state = model.prefill(ids[:, :split], model.init_state(2))
    assert (head - parallel[:, :split]).abs().max() < 1e-4
    tail, _ = model.prefill(ids[:, split:], state)
    assert (tail - parallel[:, split:]).abs().max() < 1e-4
    stepped, _ = model.step(ids[:, split], state)
    assert (stepped - parallel[:, split]).abs().max() < 1e-4


@torch.no_grad()
def test_state_is_small_and_selectable():
    model = tiny_model()
    ids = torch.randint(0, 97, (3, 10))
    _, state = model.prefill(ids, model.init_state(3))
    L, C = model.config.n_layer, model.config.n_embd
    assert state.nbytes() == 4 * 7 * L * 3 * C  # seven float32 vectors of C per layer and sequence
    one, _ = model.prefill(ids[1:2, 5:], model.prefill(ids[1:2, :5], model.init_state(1))[1])
    _, half = model.prefill(ids[:, :5], model.init_state(3))
    again, _ = model.prefill(ids[1:2, 5:], half.select([1]))
    assert torch.allclose(one, again, atol=1e-6)


def test_bad_token_ids_and_sequences():
    model = tiny_model()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="integers"):
        model(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        model.step(torch.tensor([[1, 2]]), model.init_state(1))


def test_state_from_another_model_or_batch():
    model, other = tiny_model(), tiny_model(n_embd=16)
    with pytest.raises(ValueError, match="another model"):
        model.step(torch.tensor([1]), other.init_state(1))
    with pytest.raises(ValueError, match="holds 2 sequences"):
        model.step(torch.tensor([1]), model.init_state(2))
    with pytest.raises(ValueError, match="RecurrentState"):
        model.prefill(torch.tensor([[1]]), {"att_shift": None})
    assert isinstance(model.init_state(1), RecurrentState)


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no SpikeGPT checkpoint"):
        load_model(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_model(junk)
    sd = tiny_model().state_dict()
    with pytest.raises(ValueError, match="missing keys .*blocks.1.att.key.weight.*unexpected keys .*extra"):
        broken = dict(sd)
        del broken["blocks.1.att.key.weight"]
        broken["extra.weight"] = torch.zeros(1)
        load_model(broken)
    with pytest.raises(ValueError, match=r"missing keys \['emb.weight'"):
        load_model({"foo": torch.zeros(2)})
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_model(tmp_path / "list.pth")
