"""LoRA / SpikeLoRA adapters: init identity, recurrent parity, the LIF gate, gradients, checkpoints, sparsity."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import tiny_model
from safetensors.torch import save_file
from torch import nn

from spikegpt_ft.adapters import (
    DEFAULT_TARGETS,
    AdapterConfig,
    AdapterLinear,
    SparsityMeter,
    adapter_modules,
    attach_adapters,
    base_fingerprint,
    base_state_dict,
    count_parameters,
    load_adapters,
    merge_adapters,
    official_name,
    read_adapter_metadata,
    save_adapters,
    unmerge_adapters,
)
from spikegpt_ft.model import fire

KINDS = ["lora", "spikelora"]
VOCAB = 97


def ids(b: int = 2, t: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, t), generator=g)


def stepwise(model, x: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] computed one token at a time through model.step."""
    state = model.init_state(x.shape[0])
    out = []
    for t in range(x.shape[1]):
        logits, state = model.step(x[:, t], state)
        out.append(logits)
    return torch.stack(out, dim=1)


def train_a_little(model, steps: int = 3, lr: float = 1e-2, seed: int = 5) -> None:
    """A few Adam steps on a random linear loss so that every B becomes non-zero."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for i in range(steps):
        x = ids(2, 10, seed=100 + i)
        r = torch.randn(2, 10, model.config.head_out, generator=g)
        opt.zero_grad()
        (model(x) * r).sum().backward()
        opt.step()
    model.eval()


def frozen_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


# ------------------------------------------------------------------------------------------------ attach


def test_default_attach_wraps_seven_linears_per_block_and_freezes_the_base():
    model = attach_adapters(tiny_model())
    adapters = adapter_modules(model)
    assert len(adapters) == 7 * model.config.n_layer
    assert {n.split(".", 2)[2] for n in adapters} == set(DEFAULT_TARGETS)
    assert all(m.gate is not None for m in adapters.values())
    for name, p in model.named_parameters():
        assert p.requires_grad == (name.startswith("head.") or name.endswith((".lora_A", ".lora_B"))), name
    cfg = model.adapter_config
    assert (cfg.kind, cfg.rank, cfg.alpha, cfg.rslora, cfg.v_threshold, cfg.tau) == (
        "spikelora",
        8,
        math.sqrt(8),
        True,
        0.1,
        2.0,
    )
    assert cfg.scaling == pytest.approx(1.0)
    # gate neurons are model LIF nodes, so the recurrent state carries their membranes
    assert "blocks.0.att.key.gate" in model.spiking_neurons()
    # base keys map back to the official names
    assert "blocks.1.ffn.value.base.weight" in dict(model.named_parameters())
    assert official_name("blocks.1.ffn.value.base.weight") == "blocks.1.ffn.value.weight"
    assert set(base_state_dict(model)) == set(tiny_model().state_dict())
    trainable, total = count_parameters(model)
    adapter_params = sum(m.lora_A.numel() + m.lora_B.numel() for m in adapters.values())
    head_params = sum(p.numel() for p in model.head.parameters())
    assert trainable == adapter_params + head_params
    assert total == sum(p.numel() for p in tiny_model().parameters()) + adapter_params


def test_config_expresses_the_paper_and_the_public_spikegpt_setting():
    paper = AdapterConfig(kind="spikelora", rank=8, rslora=True, v_threshold=0.1)
    assert paper.alpha == pytest.approx(math.sqrt(8)) and paper.scaling == pytest.approx(1.0)
    assert AdapterConfig(rank=16).alpha == pytest.approx(4.0)
    public = attach_adapters(tiny_model(), r=16, alpha=16, rslora=False, v_threshold=0.25).adapter_config
    assert public.scaling == pytest.approx(1.0) and public.rank == 16 and public.v_threshold == 0.25
    assert attach_adapters(tiny_model(), r=4, alpha=8, rslora=False).adapter_config.scaling == pytest.approx(2.0)
    assert AdapterConfig.from_dict(public.to_dict()) == public
    with pytest.raises(AttributeError):
        public.rank = 3  # frozen


def test_target_patterns():
    model = attach_adapters(tiny_model(), kind="lora", targets=["att.key", "att.value"])
    assert sorted(adapter_modules(model)) == [f"blocks.{i}.att.{k}" for i in range(2) for k in ("key", "value")]
    model = attach_adapters(tiny_model(), kind="lora", targets=[r"blocks\.1\.ffn\..*"])
    assert sorted(adapter_modules(model)) == [f"blocks.1.ffn.{k}" for k in ("key", "receptance", "value")]
    assert all(m.gate is None for m in adapter_modules(model).values())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "dora"}, "kind"),
        ({"r": 0}, "rank"),
        ({"r": 2.5}, "rank"),
        ({"targets": ["att.nothing"]}, "matches no linear"),
        ({"dropout": 1.0}, "dropout"),
        ({"tau": 1.0}, "tau"),
        ({"v_threshold": 0.0}, "v_threshold"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        attach_adapters(tiny_model(), **kwargs)


def test_attaching_twice_is_an_error():
    model = attach_adapters(tiny_model())
    with pytest.raises(ValueError, match="already"):
        attach_adapters(model, kind="lora")


# ------------------------------------------------------------------------------------------------ 1, 2


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_adapters_give_the_base_model_exactly(kind):
    x = ids()
    base = tiny_model()
    with torch.no_grad():
        expect = base(x)
        model = attach_adapters(tiny_model(), kind=kind)
        assert torch.equal(model(x), expect)
        assert torch.equal(stepwise(model, x), stepwise(base, x))
        assert torch.allclose(stepwise(model, x), expect, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_recurrent_equals_parallel_after_training(kind):
    model = attach_adapters(tiny_model(), kind=kind)
    train_a_little(model)
    assert all(m.lora_B.abs().sum() > 0 for m in adapter_modules(model).values())
    x = ids(3, 14)
    with torch.no_grad():
        parallel = model(x)
        assert not torch.allclose(parallel, tiny_model()(x), atol=1e-3)  # the adapters do something
        recurrent = stepwise(model, x)
        # parallel prefix then steps
        logits, state = model.prefill(x[:, :9], model.init_state(3))
        for t in range(9, 14):
            step_logits, state = model.step(x[:, t], state)
            torch.testing.assert_close(step_logits, parallel[:, t], atol=1e-4, rtol=0)
    torch.testing.assert_close(recurrent, parallel, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, parallel[:, :9], atol=1e-4, rtol=0)
    if kind == "spikelora":
        gates = [n for n in state.membranes if n.endswith(".gate")]
        assert len(gates) == 7 * model.config.n_layer
        assert all(state.membranes[n].shape == (3, model.adapter_config.rank) for n in gates)


# ------------------------------------------------------------------------------------------------ 3


class _Heaviside(torch.autograd.Function):
    """Spike = (h - vth >= 0); backward: the ATan surrogate with alpha = 2."""

    @staticmethod
    def forward(ctx, u):
        ctx.save_for_backward(u)
        return (u >= 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        alpha = 2.0
        return grad * (alpha / 2) / (1 + (math.pi / 2 * alpha * u) ** 2)


def reference_lif(x: torch.Tensor, vth: float, tau: float = 2.0) -> torch.Tensor:
    """Plain LIF along dim 1 of ``x`` [B, T, C]: decay-input charge, hard reset to 0, reset not detached."""
    v = torch.zeros_like(x[:, 0])
    spikes = []
    for t in range(x.shape[1]):
        h = v + (x[:, t] - v) / tau
        s = _Heaviside.apply(h - vth)
        v = h * (1 - s)
        spikes.append(s)
    return torch.stack(spikes, dim=1)


def test_gate_matches_an_independent_lif():
    torch.manual_seed(3)
    k, d, r, vth = 6, 5, 4, 0.1
    layer = AdapterLinear(
        nn.Linear(k, d, bias=False), AdapterConfig(kind="spikelora", rank=r, alpha=2.0, v_threshold=vth)
    )
    layer.base.weight.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 9, k)
    w_out = torch.randn(3, 9, d)

    layer.gate.reset()
    out = layer(x)
    layer.gate.reset()
    spikes = fire(layer.gate, x @ layer.lora_A.detach().T)
    layer.gate.reset()
    (out * w_out).sum().backward()

    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    a = x @ A.T
    ref_spikes = reference_lif(a, vth)
    ref_out = x @ layer.base.weight.T + layer.scaling * ((ref_spikes * a) @ B.T)
    (ref_out * w_out).sum().backward()

    assert 0.1 < ref_spikes.mean() < 0.9  # a mix of spikes and silence
    assert torch.equal(spikes, ref_spikes.detach())
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.lora_B.grad, B.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad, A.grad, atol=1e-5, rtol=1e-5)
    # the surrogate path matters: the reference without it gives another A gradient
    A2 = A.detach().clone().requires_grad_(True)
    a2 = x @ A2.T
    (((x @ layer.base.weight.T + layer.scaling * ((ref_spikes.detach() * a2) @ B.detach().T)) * w_out).sum()).backward()
    assert not torch.allclose(A2.grad, A.grad, atol=1e-5)


# ------------------------------------------------------------------------------------------------ 4


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_adapter_and_the_frozen_base_never_moves(kind):
    model = attach_adapters(tiny_model(), kind=kind)
    train_a_little(model, steps=1)  # B non-zero
    frozen = frozen_tensors(model)
    assert frozen and all(not n.startswith("head.") for n in frozen)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    opt.zero_grad()
    (model(ids(2, 10, seed=7)) * torch.randn(2, 10, VOCAB)).sum().backward()
    for name, m in adapter_modules(model).items():
        assert m.lora_A.grad is not None and m.lora_A.grad.abs().sum() > 0, name
        assert m.lora_B.grad is not None and m.lora_B.grad.abs().sum() > 0, name
    assert model.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    opt.step()
    train_a_little(model, steps=2)
    assert all(len(opt.state[p]) == 0 for p in model.parameters() if not p.requires_grad)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]), name


# ------------------------------------------------------------------------------------------------ 5


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(tmp_path, kind):
    model = attach_adapters(tiny_model(), kind=kind, r=4, alpha=8, rslora=False, v_threshold=0.25)
    model.reset_head(3)
    model.head.requires_grad_(True)
    train_a_little(model)
    path = save_adapters(model, tmp_path / "sub" / "adapters.safetensors", {"task": "sst2", "labels": '["neg","pos"]'})
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    x = ids(2, 11)
    with torch.no_grad():
        expect = model(x)
        loaded = load_adapters(tiny_model(), path)  # an LM-head base: the saved 3-way head replaces it
        assert torch.equal(loaded(x), expect)
        assert torch.equal(stepwise(loaded, x), stepwise(model, x))
    assert loaded.adapter_config == model.adapter_config
    assert loaded.config == model.config
    assert count_parameters(loaded) == count_parameters(model)
    meta = read_adapter_metadata(path)
    assert meta["extra"] == {"task": "sst2", "labels": '["neg","pos"]'}
    assert meta["adapter_config"] == model.adapter_config
    assert meta["base_fingerprint"] == base_fingerprint(tiny_model())
    assert meta["head"] == {"in": 32, "out": 3, "bias": True}
    # loading into a model that already carries the same adapters just refreshes the weights
    again = attach_adapters(tiny_model(), kind=kind, r=4, alpha=8, rslora=False, v_threshold=0.25)
    with torch.no_grad():
        assert torch.equal(load_adapters(again, path)(x), expect)


def test_load_onto_another_base_is_an_error(tmp_path):
    path = save_adapters(attach_adapters(tiny_model(seed=0)), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="another base"):
        load_adapters(tiny_model(seed=1), path)
    other = tiny_model(seed=0)
    with torch.no_grad():
        other.blocks[1].ffn.value.weight[0, 0] += 0.1  # one weight differs
    with pytest.raises(ValueError, match="another base"):
        load_adapters(other, path)


def test_wrong_rank_is_an_error(tmp_path):
    model = attach_adapters(tiny_model(), r=4)
    path = save_adapters(model, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="differ"):
        load_adapters(attach_adapters(tiny_model(), r=8), path)
    # a file whose tensors disagree with its own config
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    meta["adapter_config"] = meta["adapter_config"].replace('"rank": 4', '"rank": 8')
    save_file(load_file(str(path)), str(tmp_path / "b.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="rank"):
        load_adapters(tiny_model(), tmp_path / "b.safetensors")


def test_corrupt_or_foreign_files_are_errors(tmp_path):
    path = save_adapters(attach_adapters(tiny_model()), tmp_path / "a.safetensors")
    data = path.read_bytes()
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file at all")
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    torch.save({"x": torch.zeros(2)}, tmp_path / "pickle.pt")
    for name in ["garbage.safetensors", "truncated.safetensors", "foreign.safetensors", "pickle.pt"]:
        with pytest.raises(ValueError):
            load_adapters(tiny_model(), tmp_path / name)
        with pytest.raises(ValueError):
            read_adapter_metadata(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        read_adapter_metadata(tmp_path / "missing.safetensors")


def test_fingerprint_ignores_dtype_adapters_and_head_but_not_weights():
    base = tiny_model()
    fp = base_fingerprint(base)
    assert fp.startswith("sha256:")
    assert base_fingerprint(tiny_model().to(torch.bfloat16)) == fp
    assert base_fingerprint(base.state_dict()) == fp
    adapted = attach_adapters(tiny_model())
    adapted.reset_head(2)
    assert base_fingerprint(adapted) == fp
    assert base_fingerprint(tiny_model(seed=1)) != fp


# ------------------------------------------------------------------------------------------------ 6


def run_sparsity(model, x, mask=None) -> dict[str, float]:
    meter = SparsityMeter(model)
    with torch.no_grad(), meter.recording(mask):
        model(x)
    return meter.result()


def test_sparsity_lora_has_no_gate_and_spikelora_rises_with_threshold():
    x = ids(2, 16)
    assert run_sparsity(attach_adapters(tiny_model(), kind="lora"), x) == {}  # no gate: nothing to measure
    means = []
    for vth in (0.05, 0.1, 0.5, 1.0):
        torch.manual_seed(11)  # the same A for every threshold
        result = run_sparsity(attach_adapters(tiny_model(), v_threshold=vth), x)
        assert set(result) == {
            *(f"blocks.{i}.{t}" for i in range(2) for t in DEFAULT_TARGETS),
            "blocks.0",
            "blocks.1",
            "mean",
        }
        assert result["blocks.0"] == pytest.approx(sum(result[f"blocks.0.{t}"] for t in DEFAULT_TARGETS) / 7)
        means.append(result["mean"])
    assert 0.0 < means[1] < 1.0
    assert means == sorted(means) and means[0] < means[-1]


def test_sparsity_equals_a_count_of_the_gated_activations():
    """The meter's fraction against zeros counted by hand from forward hooks on the gated products."""
    model = attach_adapters(tiny_model(), v_threshold=0.2)
    x = ids(2, 9)
    seen = {}
    hooks = [
        m.gate.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, (inp[0], out)))
        for name, m in adapter_modules(model).items()
    ]
    result = run_sparsity(model, x)
    for h in hooks:
        h.remove()
    for name, (a, spikes) in seen.items():
        assert result[name] == pytest.approx(float(((a * spikes) == 0).double().mean()), abs=0), name


def test_sparsity_counts_real_tokens_only_and_accumulates():
    model = attach_adapters(tiny_model())
    real = ids(2, 10)
    padded = torch.cat([real, torch.full((2, 6), 1)], dim=1)  # padding after the text (causal: text unaffected)
    mask = torch.cat([torch.ones(2, 10, dtype=torch.bool), torch.zeros(2, 6, dtype=torch.bool)], dim=1)
    unpadded = run_sparsity(model, real)
    assert run_sparsity(model, padded, mask) == unpadded
    assert run_sparsity(model, padded) != unpadded  # the padding would change the figure if counted
    mask2 = mask.clone()
    mask2[1, 4:] = False  # ragged padding: row 0 has 10 real tokens, row 1 only 4
    assert 0.0 < run_sparsity(model, padded, mask2)["mean"] < 1.0
    # counts accumulate over recordings until reset; step calls take a [B, 1] mask or none
    meter = SparsityMeter(model)
    with torch.no_grad():
        with meter.recording():
            model(real)
        once = meter.counts().clone()
        with meter.recording(torch.tensor([[True], [False]])):
            model.step(real[:, 0], model.init_state(2))
    assert torch.all(meter.counts()[:, 1] > once[:, 1])
    assert all(0.0 <= v <= 1.0 for v in meter.result().values())
    # a [B, T] mask for a step call is an error, not a silent miscount
    with pytest.raises(ValueError, match="token mask"), torch.no_grad(), meter.recording(mask):
        model.step(real[:, 0], model.init_state(2))
    # nothing outside a recording is counted; counters are not in the state dict; no token seen -> NaN
    meter.reset()
    with torch.no_grad():
        model(real)
    assert not any("sparsity" in k for k in model.state_dict())
    assert math.isnan(meter.result()["mean"])


def test_meters_count_only_inside_their_own_recording():
    model = attach_adapters(tiny_model())
    outer, inner = SparsityMeter(model), SparsityMeter(model)
    with torch.no_grad(), outer.recording():
        model(ids())
        with inner.recording():
            model(ids())
    # each counted one pass of the same shape: the inner pass went to the inner meter only
    assert torch.all(inner.counts()[:, 1] > 0) and torch.equal(inner.counts()[:, 1], outer.counts()[:, 1])
    assert len(SparsityMeter(tiny_model())) == 0 and SparsityMeter(tiny_model()).result() == {}


def test_counting_works_across_inference_mode_and_training():
    model = attach_adapters(tiny_model())
    meter = SparsityMeter(model)
    with torch.inference_mode(), meter.recording():
        model(ids())
    model.train()
    with meter.recording():
        model(ids()).sum().backward()  # counters touched in inference mode still update under autograd
    assert 0.0 < meter.result()["mean"] < 1.0


# ------------------------------------------------------------------------------------------------ merge


def test_merge_and_unmerge_lora():
    model = attach_adapters(tiny_model(), kind="lora")
    train_a_little(model)
    x = ids()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        expect = model(x)
        merge_adapters(model)
        merge_adapters(model)  # idempotent
        torch.testing.assert_close(model(x), expect, atol=1e-5, rtol=0)
        torch.testing.assert_close(stepwise(model, x), expect, atol=1e-4, rtol=0)
        with pytest.raises(ValueError, match="unmerge"):
            base_fingerprint(model)
        unmerge_adapters(model)
        torch.testing.assert_close(model(x), expect, atol=1e-5, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], atol=1e-6, rtol=0)


def test_spikelora_cannot_be_merged():
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_adapters(attach_adapters(tiny_model()))


def test_bfloat16_model_computes_in_bfloat16():
    model = attach_adapters(tiny_model().to(torch.bfloat16))
    assert model.blocks[0].att.key.lora_A.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(ids())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# ------------------------------------------------------------------------------------------------ head and old files


def test_head_target_adds_an_adapter_and_keeps_the_head_weight_trained():
    """The SpikeLoRA authors' SpikeGPT experiment adapts the head as well and trains its weight in full."""
    model = tiny_model(head_out=2)
    attach_adapters(model, targets=["att.key", "head"])
    assert isinstance(model.head, AdapterLinear) and model.head.gate is not None
    assert model.head.base.weight.requires_grad and model.head.lora_A.requires_grad
    assert not model.blocks[0].att.value.weight.requires_grad


def test_first_format_adapter_files_load_with_the_temporal_gate(tmp_path):
    """A version-1 file (keys ``r``, ``dropout``, no ``gate``) loads, as the temporal gate it was trained with."""
    model = attach_adapters(tiny_model(), r=4, alpha=8, rslora=False, v_threshold=0.25)
    train_a_little(model)
    path = save_adapters(model, tmp_path / "new.safetensors")
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    config = json.loads(meta["adapter_config"])
    config["r"], config["dropout"] = config.pop("rank"), config.pop("lora_dropout")
    del config["gate"]
    meta["adapter_config"], meta["version"] = json.dumps(config), "1"
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"), metadata=meta)
    loaded = load_adapters(tiny_model(), tmp_path / "old.safetensors")
    assert loaded.adapter_config == model.adapter_config and loaded.adapter_config.gate == "temporal"
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ pointwise gate


def reference_pointwise(x: torch.Tensor, vth: float, tau: float = 2.0) -> torch.Tensor:
    """The authors' gate written plainly: a fresh membrane at every token, so h = x / tau; spike iff h >= vth."""
    return _Heaviside.apply(x / tau - vth)


@pytest.mark.parametrize("vth", [0.1, 0.25])
def test_pointwise_gate_matches_a_plain_reference_forward_and_surrogate_gradients(vth):
    torch.manual_seed(5)
    k, d, r = 6, 5, 4
    config = AdapterConfig(kind="spikelora", rank=r, alpha=2.0, v_threshold=vth, gate="pointwise")
    layer = AdapterLinear(nn.Linear(k, d, bias=False), config)
    layer.base.weight.requires_grad_(False)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 9, k)
    w_out = torch.randn(3, 9, d)
    out = layer(x)
    (out * w_out).sum().backward()
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    a = x @ A.T
    spikes = reference_pointwise(a, vth)
    assert 0 < spikes.mean() < 1  # both outcomes occur
    ref_out = x @ layer.base.weight.T + layer.scaling * ((spikes * a) @ B.T)
    (ref_out * w_out).sum().backward()
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.lora_A.grad, A.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, B.grad, atol=1e-5, rtol=1e-5)
    # a token's decision does not depend on the tokens before it (unlike the temporal gate)
    alone = layer(x[:, 4:5])
    torch.testing.assert_close(alone, out[:, 4:5], atol=1e-6, rtol=0)


def test_the_two_gates_disagree_on_real_inputs():
    torch.manual_seed(6)
    base = nn.Linear(16, 8, bias=False)
    temporal = AdapterLinear(base, AdapterConfig(kind="spikelora", rank=8, v_threshold=0.1, gate="temporal"))
    pointwise = AdapterLinear(base, AdapterConfig(kind="spikelora", rank=8, v_threshold=0.1, gate="pointwise"))
    with torch.no_grad():
        pointwise.lora_A.copy_(temporal.lora_A)
        x = torch.randn(2, 32, 16)
        a = x @ temporal.lora_A.T
        temporal.gate.reset()
        masks = [fire(temporal.gate, a), reference_pointwise(a, 0.1)]
    disagree = (masks[0] != masks[1]).float().mean()
    assert 0 < disagree < 0.5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gate", ["temporal", "pointwise"])
def test_recurrent_equals_parallel_for_both_gates(kind, gate):
    model = attach_adapters(tiny_model(), kind=kind, gate=gate, v_threshold=0.1)
    train_a_little(model)
    model.eval()
    x = ids(2, 14)
    with torch.no_grad():
        parallel = model(x)
        torch.testing.assert_close(stepwise(model, x), parallel, atol=1e-4, rtol=0)
    carried = model.carried_neurons()
    gates = [n for n in carried if n.endswith(".gate")]
    assert len(gates) == (7 * model.config.n_layer if (kind, gate) == ("spikelora", "temporal") else 0)
