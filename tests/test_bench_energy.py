"""The benchmark CLI on a tiny shape, and the operation / energy account against hand counts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_model

from spikegpt_ft import bench, energy
from spikegpt_ft.adapters import attach_adapters
from spikegpt_ft.model import SpikeGPTConfig

TINY = ["--layers", "1", "--embd", "32", "--vocab", "97", "--repeats", "2", "--warmup", "1"]


def test_bench_all_tiny_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["all", "--device", "cpu", *TINY, "--batch", "2", "--tokens", "8", "--rank", "2", "--fwd-tokens", "8",
                "--rec-steps", "3", "--rec-batch", "4", "--rec-batch-steps", "2", "--json", str(out)])
    data = json.loads(out.read_text())
    env = data["env"]
    for key in ("device", "device_name", "torch", "cuda", "threads", "dtype", "model_shape"):
        assert key in env
    assert env["model_shape"] == {"layers": 1, "embd": 32, "vocab": 97, "ffn": 128}
    names = {r["name"] for r in data["results"]}
    lif = {f"lif_{who}_{what}" for who in ("model", "spikingjelly") for what in ("fwd", "fwd_bwd")}
    wkv = {"wkv_fwd", "wkv_fwd_bwd", "wkv_gate_fused_fwd_bwd", "wkv_gate_separate_fwd_bwd"}
    assert names == {*wkv, "full_finetune_step", "lora_r2_step", "spikelora_r2_step",
                     "parallel_forward", "recurrent_b1", "recurrent_b4", "elementwise_floor", *lif}
    for r in data["results"]:
        assert len(r["times_ms"]) == (3 if r["name"] == "recurrent_b1" else 2 if r["name"] == "recurrent_b4" else 2)
        assert r["median_ms"] > 0 and r["peak_mem_mb"] > 0 and r["peak_mem_kind"] == "process_max_rss"
        assert r["section"] == "lif" or r["tokens_per_s"] > 0
    lif_shapes = {tuple(r["shape"].values()) for r in data["results"] if r["section"] == "lif"}
    assert lif_shapes == set(bench.LIF_SHAPES)
    rec = {r["name"]: r for r in data["results"] if r["section"] == "recurrent"}
    assert rec["recurrent_b1"]["ms_per_token"] == pytest.approx(rec["recurrent_b1"]["median_ms"])
    train = {r["name"]: r for r in data["results"] if r["section"] == "train"}
    assert train["lora_r2_step"]["trainable_params"] < train["full_finetune_step"]["trainable_params"]


def test_bench_recurrent_bf16_weights(tmp_path):
    results = bench.main(["recurrent", "--device", "cpu", "--dtype", "bfloat16", *TINY,
                          "--rec-steps", "2", "--rec-batch", "3", "--rec-batch-steps", "2"])
    assert [r["weights_dtype"] for r in results] == ["bfloat16", "bfloat16"]
    assert [r["state_dtype"] for r in results] == ["float32", "float32"]


# --------------------------------------------------------------------------------------------- energy

CFG = SpikeGPTConfig(vocab_size=11, n_embd=4, n_layer=1, ffn_hidden=16, head_out=5)
RATES = {"blocks.0.lif1": 0.25, "blocks.0.lif2": 0.5, "embedding": 0.5,
         **{f"blocks.0.{t}.gate": 0.2 for t in energy.BLOCK_LINEARS}}


def _tot(account, adapter, r=2):
    return energy.totals(energy.operation_account(CFG, RATES, account, adapter, r))


def test_energy_as_implemented_base_is_dense():
    t = _tot("as_implemented", "none")
    # att: 4 of 4x4; ffn.key 4x16, ffn.receptance 4x4, ffn.value 16x4; head 4x5
    macs = 4 * 16 + 64 + 16 + 64 + 20
    acs = 0.25 * 4 + 0.5 * 4  # spikes added to the residual
    assert t["macs"] == macs and t["dense_macs"] == macs
    assert t["acs"] == pytest.approx(acs)
    assert t["energy_j"] == pytest.approx(4.6e-12 * macs + 0.9e-12 * acs)


def test_energy_spike_driven_assumption_counts_rate_times_fan_in_out():
    t = _tot("spike_driven_assumption", "none")
    acs = 3 * 0.5 * 4 * 4 + 0.25 * 4 * 16 + 0.25 * 4 * 4 + (0.25 * 4 + 0.5 * 4)
    macs = 16 + 64 + 20  # att.output, ffn.value, head stay dense
    assert t["macs"] == macs
    assert t["acs"] == pytest.approx(acs)
    assert t["energy_j"] == pytest.approx(4.6e-12 * macs + 0.9e-12 * acs)
    assert t["dense_energy_j"] == pytest.approx(4.6e-12 * (4 * 16 + 64 + 16 + 64 + 20))


def test_energy_adapters_lora_dense_spikelora_sparse_b():
    base = _tot("as_implemented", "none")["macs"]
    fans = [(4, 4)] * 4 + [(4, 16), (4, 4), (16, 4)]  # (in, out) of the 7 targets
    r = 2
    lora = _tot("as_implemented", "lora", r)
    assert lora["macs"] - base == sum(r * k + r * d for k, d in fans)
    spike = _tot("as_implemented", "spikelora", r)
    assert spike["macs"] - base == pytest.approx(sum(r * k + 0.2 * r * d for k, d in fans))
    # under the assumption, A of a spike-driven base reads spikes too (ACs at the base's rate)
    sd = energy.operation_account(CFG, RATES, "spike_driven_assumption", "spikelora", r)
    a_key = next(o for o in sd if o.name == "blocks.0.att.key" and o.part == "adapter_A")
    assert (a_key.macs, a_key.acs) == (0.0, 0.5 * 4 * r)


def test_energy_rejects_missing_or_bad_rates():
    with pytest.raises(KeyError, match="blocks.0.lif2"):
        energy.operation_account(CFG, {"blocks.0.lif1": 0.1}, "as_implemented")
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        energy.operation_account(CFG, {**RATES, "blocks.0.lif1": 1.5}, "as_implemented")


def test_measure_rates_hooks_every_lif_and_gate():
    model = tiny_model(n_layer=2)
    attach_adapters(model, kind="spikelora", r=4)
    ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(0))
    rates = energy.measure_rates(model, ids, batch=2)
    assert set(rates) == set(model.lif_nodes()) | {"embedding"}
    # independent count for one LIF: its spikes are what the block adds to the residual
    spikes = []
    h = model.blocks[1].lif2.register_forward_hook(lambda m, i, o: spikes.append(o.detach()))
    with torch.no_grad():
        model(ids)
    h.remove()
    assert rates["blocks.1.lif2"] == pytest.approx(spikes[0].float().mean().item())
    assert all(0 <= v <= 1 for v in rates.values()) and 0 < rates["blocks.0.lif1"] < 1


def test_load_rates_from_run_sparsity(tmp_path):
    f = tmp_path / "metrics.json"
    f.write_text(json.dumps({"rates": {"blocks.0.lif1": 0.3}, "sparsity": {"blocks.0.att.key": 0.75, "mean": 0.7}}))
    rates = energy.load_rates(f)
    assert rates["blocks.0.lif1"] == 0.3 and rates["blocks.0.att.key.gate"] == pytest.approx(0.25)
    assert "mean.gate" not in rates


def test_energy_cli_tiny(tmp_path, shared):
    out, md = tmp_path / "e.json", tmp_path / "e.md"
    rep = energy.main(["--layers", "1", "--embd", "16", "--vocab", "50277", "--rank", "2", "--chunks", "1",
                       "--tokens", "16", "--data-dir", str(shared / "data" / "subj"),
                       "--tokenizer", str(shared / "tokenizer" / "20B_tokenizer.json"),
                       "--json", str(out), "--markdown", str(md)])
    data = json.loads(out.read_text())
    assert set(data["accounts"]) == {f"{a}/{k}" for a in energy.ACCOUNTS for k in energy.ADAPTER_KINDS}
    t = data["accounts"]["as_implemented/none"]["totals"]
    assert t["energy_j"] == pytest.approx(4.6e-12 * t["macs"] + 0.9e-12 * t["acs"])
    assert math.isclose(t["macs"], 4 * 16 * 16 + 2 * 16 * 64 + 16 * 16 + 16 * 50277)
    assert "spike_driven_assumption" in md.read_text() and rep["rank"] == 2
