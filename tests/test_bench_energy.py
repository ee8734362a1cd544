"""The benchmark CLI on a tiny shape, and the operation / energy account against hand counts."""

from __future__ import annotations

import json
import math
import shlex

import pytest
import torch
from helpers import tiny_model

from spikegpt_ft.adapters import attach_adapters
from spikegpt_ft.model import SpikeGPTConfig
from spikegpt_ft.ops import extension
from spikegpt_ft.ops.linear import product_kernel, stream_prefetch
from spikegpt_ft.tools import bench, energy

TINY = ["--layers", "1", "--embd", "32", "--vocab", "97", "--repeats", "2", "--warmup", "1"]
# the linear weights of the tiny shape (C 32, FFN 128, vocabulary 97, one block), counted by hand:
# att key/value/receptance/output 4 x 32 x 32, ffn key 32 x 128, receptance 32 x 32, value 128 x 32, head 32 x 97
TINY_LINEAR_PARAMS = 4 * 32 * 32 + 32 * 128 + 32 * 32 + 128 * 32 + 32 * 97


def test_bench_all_tiny_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["all", "--device", "cpu", *TINY, "--batch", "2", "--tokens", "8", "--rank", "2", "--fwd-tokens", "8",
            "--rec-steps", "3", "--rec-batch", "4", "--rec-batch-steps", "2", "--json", str(out)]  # fmt: skip
    bench.main(argv)
    data = json.loads(out.read_text())
    env = data["env"]
    for key in ("device", "device_name", "torch", "cuda", "threads", "dtype", "model_shape", "cpu_simd_flags"):
        assert key in env
    assert env["cpu_loops"] == extension().cpu_loops()  # which compiled loops ran (SPIKEGPT_FT_CPU_LOOPS)
    assert env["model_shape"] == {"layers": 1, "embd": 32, "vocab": 97, "ffn": 128}
    assert shlex.split(env["command"]) == ["spikegpt-ft", "bench", *argv]  # the arguments bench ran with
    names = {r["name"] for r in data["results"]}
    lif = {f"lif_{who}_{what}" for who in ("model", "spikingjelly") for what in ("fwd", "fwd_bwd")}
    wkv = {"wkv_fwd", "wkv_fwd_bwd", "wkv_gate_fused_fwd_bwd", "wkv_gate_separate_fwd_bwd"}
    assert names == {*wkv, "full_finetune_step", "lora_r2_step", "spikelora_r2_step",
                     "parallel_forward", "recurrent_b1", "recurrent_b4", "elementwise_floor", *lif}  # fmt: skip
    for r in data["results"]:
        assert len(r["times_ms"]) == (3 if r["name"] == "recurrent_b1" else 2)
        assert r["median_ms"] > 0 and r["peak_mem_mb"] > 0 and r["peak_mem_kind"] == "process_max_rss"
        assert r["section"] == "lif" or r["tokens_per_s"] > 0
        assert ("weight_read_ms" in r) == (r["section"] == "recurrent")
    lif_shapes = {tuple(r["shape"].values()) for r in data["results"] if r["section"] == "lif"}
    assert lif_shapes == set(bench.LIF_SHAPES)
    rec = {r["name"]: r for r in data["results"] if r["section"] == "recurrent"}
    assert rec["recurrent_b1"]["ms_per_token"] == pytest.approx(rec["recurrent_b1"]["median_ms"])
    for r in rec.values():
        assert r["weight_bytes"] == 4 * TINY_LINEAR_PARAMS  # float32
        assert r["weight_read_ms"] > 0 and r["weight_read_prefetch"] in extension().read_prefetches()
        assert r["step_over_weight_read"] == pytest.approx(r["median_ms"] / r["weight_read_ms"])
        assert r["kernel"] == "torch"  # float32 weights: PyTorch's product
        flops = 2 * TINY_LINEAR_PARAMS * r["shape"]["B"]
        assert r["linear_gflop_per_s"] == pytest.approx(flops / r["median_ms"] / 1e6)
        assert r["read_bound_gflop_per_s"] == pytest.approx(flops / r["weight_read_ms"] / 1e6)
        assert set(r["matmul_gflop_per_s"]) == {"bfloat16", "float32"} and min(r["matmul_gflop_per_s"].values()) > 0
    train = {r["name"]: r for r in data["results"] if r["section"] == "train"}
    assert train["lora_r2_step"]["trainable_params"] < train["full_finetune_step"]["trainable_params"]
    # the printed table shows the read time and the ratio beside the recurrent rows only
    table = capsys.readouterr().out
    assert "weight read ms" in table and "step/read" in table
    b1 = next(line for line in table.splitlines() if "recurrent_b1" in line)
    assert f"{rec['recurrent_b1']['step_over_weight_read']:.2f}" in b1.split()
    fwd = next(line for line in table.splitlines() if "parallel_forward" in line)
    assert len(fwd.split()) < len(b1.split())


@pytest.mark.parametrize("fastest", ["none", "l1-2k", "l2-16k"])
def test_the_weight_read_is_the_fastest_way_of_reading(monkeypatch, fastest):
    """time_weight_read times read_bytes in each of its ways and keeps the fastest, whichever it is."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16))
    timed = []

    def fake_time_fn(fn, device, warmup, repeats):
        assert fn() == extension().read_bytes([m.weight.detach().reshape(-1) for m in model])  # a real read
        way = fn.args[1]
        timed.append(way)
        return [0.002 if way == fastest else 0.003] * repeats

    monkeypatch.setattr(bench, "time_fn", fake_time_fn)
    read = bench.time_weight_read(model, torch.device("cpu"), 0, 3)
    assert timed == extension().read_prefetches()
    assert read["weight_read_prefetch"] == fastest and read["weight_read_ms"] == pytest.approx(2.0)
    assert read["weight_bytes"] == 4 * (64 * 32 + 32 * 16)


def test_bench_recurrent_bf16_weights():
    results = bench.main(["recurrent", "--device", "cpu", "--dtype", "bfloat16", *TINY,
                          "--rec-steps", "2", "--rec-batch", "3", "--rec-batch-steps", "2"])  # fmt: skip
    assert [r["weights_dtype"] for r in results] == ["bfloat16", "bfloat16"]
    assert [r["state_dtype"] for r in results] == ["float32", "float32"]
    assert [r["weight_bytes"] for r in results] == [2 * TINY_LINEAR_PARAMS] * 2
    # the kernel the CPU inference layers chose for each batch, as they choose it
    assert [r["kernel"] for r in results] == [product_kernel(1, torch.bfloat16), product_kernel(3, torch.bfloat16)]
    assert results[0]["kernel"].startswith("stream-")
    # both batches are up to four rows: the streaming kernel reads the weights from memory, with the measured prefetch
    assert [r["prefetch"] for r in results] == [stream_prefetch()] * 2
    assert f"({stream_prefetch()})" in bench.format_table(results)


def test_bench_random_model_fires():
    """The benchmark's random weights make the LIFs spike (torch's default init leaves them almost silent)."""
    ns = bench.build_parser().parse_args(["recurrent", "--layers", "1", "--embd", "32", "--vocab", "97"])
    model = bench.random_model(ns, torch.device("cpu")).eval()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    rates = energy.measure_rates(model, ids)
    assert 0.01 < rates["blocks.0.lif1"] < 0.99
    assert bench.build_parser().prog == "spikegpt-ft bench"


# --------------------------------------------------------------------------------------------- energy

CFG = SpikeGPTConfig(vocab_size=11, n_embd=4, n_layer=1, ffn_hidden=16, head_out=5)
RATES = {"blocks.0.lif1": 0.25, "blocks.0.lif2": 0.5, "embedding": 0.5,
         **{f"blocks.0.{t}.gate": 0.2 for t in energy.BLOCK_LINEARS}}  # fmt: skip
# forward MACs of CFG by hand: att 4 x (4 x 4), ffn.key 4 x 16, ffn.receptance 4 x 4, ffn.value 16 x 4, head 4 x 5
BASE_MACS = 4 * 16 + 64 + 16 + 64 + 20  # 228
# rank-2 adapters on the 7 block layers: A r x fan_in, B r x fan_out
ADAPTER_MACS = 4 * (2 * 4 + 2 * 4) + (2 * 4 + 2 * 16) + (2 * 4 + 2 * 4) + (2 * 16 + 2 * 4)  # 160


def _tot(account, adapter, r=2):
    return energy.totals(energy.operation_account(CFG, RATES, account, adapter, r))


def test_energy_as_implemented_base_is_dense():
    t = _tot("as_implemented", "none")
    acs = 0.25 * 4 + 0.5 * 4  # spikes added to the residual
    assert t["macs"] == BASE_MACS and t["dense_macs"] == BASE_MACS
    assert t["acs"] == pytest.approx(acs)
    assert t["energy_j"] == pytest.approx(4.6e-12 * BASE_MACS + 0.9e-12 * acs)


def test_energy_spike_driven_assumption_counts_rate_times_fan_in_out():
    t = _tot("spike_driven_assumption", "none")
    acs = 3 * 0.5 * 4 * 4 + 0.25 * 4 * 16 + 0.25 * 4 * 4 + (0.25 * 4 + 0.5 * 4)
    macs = 16 + 64 + 20  # att.output, ffn.value, head stay dense
    assert t["macs"] == macs
    assert t["acs"] == pytest.approx(acs)
    assert t["energy_j"] == pytest.approx(4.6e-12 * macs + 0.9e-12 * acs)
    assert t["dense_energy_j"] == pytest.approx(4.6e-12 * BASE_MACS)


def test_energy_adapters_lora_dense_spikelora_sparse_b():
    fans = [(4, 4)] * 4 + [(4, 16), (4, 4), (16, 4)]  # (in, out) of the 7 targets
    r = 2
    lora = _tot("as_implemented", "lora", r)
    assert lora["macs"] - BASE_MACS == ADAPTER_MACS
    spike = _tot("as_implemented", "spikelora", r)
    assert spike["macs"] - BASE_MACS == pytest.approx(sum(r * k + 0.2 * r * d for k, d in fans))
    # under the assumption, A of a spike-driven base reads spikes too (ACs at the base's rate)
    sd = energy.operation_account(CFG, RATES, "spike_driven_assumption", "spikelora", r)
    a_key = next(o for o in sd if o.name == "blocks.0.att.key" and o.part == "adapter_A")
    assert (a_key.macs, a_key.acs) == (0.0, 0.5 * 4 * r)


@pytest.mark.parametrize("account", energy.ACCOUNTS)
def test_energy_merged_lora_costs_exactly_the_base(account):
    merged = energy.operation_account(CFG, RATES, account, "lora_merged", 2)
    base = energy.operation_account(CFG, RATES, account, "none", 2)
    assert [(o.name, o.part, o.macs, o.acs) for o in merged] == [(o.name, o.part, o.macs, o.acs) for o in base]
    assert energy.totals(merged) == energy.totals(base)
    assert not any(o.part.startswith("adapter") for o in merged)
    # SpikeLoRA, even with a silent gate (B costs nothing), still pays for A: dearer than merged LoRA
    silent = {**RATES, **{f"blocks.0.{t}.gate": 0.0 for t in energy.BLOCK_LINEARS}}
    spike = energy.totals(energy.operation_account(CFG, silent, account, "spikelora", 2))
    assert spike["energy_j"] > energy.totals(merged)["energy_j"]


def test_energy_markdown_merged_row_and_spikelora_statement():
    rep = energy.report(CFG, RATES, 2, energy.ADAPTER_KINDS)
    md = energy.markdown(rep)
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| as_implemented |"):
            rows[cells[1]] = cells[2:]
    assert rows["lora (merged)"] == rows["none"] and rows["lora (unmerged)"] != rows["none"]
    assert "dearer at inference than merged LoRA" in md
    for account in energy.ACCOUNTS:
        line = next(x for x in md.splitlines() if x.startswith(f"- {account}: merged LoRA costs exactly"))
        assert "SpikeLoRA" in line and "dearer" in line and "not dearer" not in line


def test_training_step_cost_per_token_by_hand():
    # full fine-tuning: every layer trained, 3 x forward (forward, input grad, weight grad)
    full = energy.training_totals(energy.training_account(CFG, "none", 2))
    assert (full["forward_macs"], full["input_grad_macs"], full["weight_grad_macs"]) == (228, 228, 228)
    assert full["macs"] == 684 and full["step_over_forward"] == 3.0
    assert full["energy_j"] == pytest.approx(4.6e-12 * 684)
    # LoRA r 2 on a classifier: frozen block layers 2 x 208, trained head 3 x 20, trained adapters 3 x 160
    lora = energy.training_totals(energy.training_account(CFG, "lora", 2))
    assert lora["forward_macs"] == 228 + 160
    assert lora["input_grad_macs"] == 228 + 160
    assert lora["weight_grad_macs"] == 20 + 160
    assert lora["macs"] == 2 * 208 + 3 * 20 + 3 * 160 == 956
    # SpikeLoRA trains the same dense products; a frozen (language-model) head saves its weight gradient
    assert energy.training_totals(energy.training_account(CFG, "spikelora", 2)) == lora
    lm = energy.training_totals(energy.training_account(CFG, "lora", 2, head_trained=False))
    assert lm["macs"] == 956 - 20
    with pytest.raises(ValueError, match="training step"):
        energy.training_account(CFG, "lora_merged", 2)


def test_training_account_trains_what_attach_adapters_trains():
    """The account's trained / frozen split is the one the adapters really leave (requires_grad)."""
    model = tiny_model(n_layer=1, n_embd=16, vocab=37)
    model.reset_head(2)
    attach_adapters(model, kind="lora", r=2)
    params = dict(model.named_parameters())
    names = {"base": "{}.base.weight", "adapter_A": "{}.lora_A", "adapter_B": "{}.lora_B"}
    ops = energy.training_account(model.config, "lora", 2)
    for o in ops:
        name = "head.weight" if o.name == "head" else names[o.part].format(o.name)
        assert params[name].requires_grad == o.trained, name
        assert tuple(params[name].shape) in ((o.fan_out, o.fan_in), (o.fan_in, o.fan_out))
    assert sum(o.trained for o in ops) == 1 + 2 * 7


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
    assert set(rates) == set(model.spiking_neurons()) | {"embedding"}
    assert {f"blocks.1.{t}.gate" for t in energy.BLOCK_LINEARS} <= set(rates)
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
    # a run's metrics.json: per-module, per-block and mean figures; only modules become gate rates
    f.write_text(json.dumps({"test_sparsity_per_module": {"blocks.1.ffn.key": 0.9, "blocks.1": 0.8, "mean": 0.8},
                             "test_accuracy": 0.9}))  # fmt: skip
    assert energy.load_rates(f) == {"blocks.1.ffn.key.gate": pytest.approx(0.1)}


def test_task_texts_interleave_the_classes(shared):
    folder = shared / "data" / "subj"
    objective, subjective = (
        # lines end at b"\n" only: the Latin-1 files hold byte 0x85, which str.splitlines would break at
        [t.decode("latin-1").strip() for t in (folder / name).read_bytes().split(b"\n") if t.strip()]
        for name in ("subj.objective", "subj.subjective")
    )
    texts = energy.task_texts("subj", folder)
    assert texts[:4] == [objective[0], subjective[0], objective[1], subjective[1]]
    assert sorted(texts) == sorted(objective + subjective)


def test_energy_cli_tiny(tmp_path, shared):
    out, md = tmp_path / "e.json", tmp_path / "e.md"
    rep = energy.main(["--layers", "1", "--embd", "16", "--vocab", "50277", "--rank", "2", "--chunks", "1",
                       "--tokens", "16", "--data-dir", str(shared / "data" / "subj"),
                       "--tokenizer", str(shared / "tokenizer" / "20B_tokenizer.json"),
                       "--json", str(out), "--markdown", str(md)])  # fmt: skip
    data = json.loads(out.read_text())
    assert set(data["accounts"]) == {f"{a}/{k}" for a in energy.ACCOUNTS for k in energy.ADAPTER_KINDS}
    t = data["accounts"]["as_implemented/none"]["totals"]
    assert t["energy_j"] == pytest.approx(4.6e-12 * t["macs"] + 0.9e-12 * t["acs"])
    dense = 4 * 16 * 16 + 2 * 16 * 64 + 16 * 16 + 16 * 50277
    assert math.isclose(t["macs"], dense)
    assert data["accounts"]["as_implemented/lora_merged"]["totals"] == t
    assert data["training"]["none"]["macs"] == 3 * dense
    assert set(data["training"]) == set(energy.TRAINING_KINDS)
    text = md.read_text()
    assert "spike_driven_assumption" in text and "Training step" in text and rep["rank"] == 2
    assert energy.build_parser().prog == "spikegpt-ft energy"
