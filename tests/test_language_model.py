"""Language modelling: the loss falls, windows respect the document split, model.pth is the official format,
recurrent and parallel perplexity agree, and an adapter LM run generates."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FIXTURES, SHARED, TOKENIZER

from spikegpt_ft.cli.infer import main as infer_main
from spikegpt_ft.cli.train import main as train_main
from spikegpt_ft.data import TextDataModule, load_tokenizer, pack_windows, token_byte_lengths
from spikegpt_ft.inference import evaluation
from spikegpt_ft.model import load_model
from spikegpt_ft.runs import RunConfig, load_run
from spikegpt_ft.training import SpikeGPTLanguageModel, build_base

TEXT = SHARED / "docs" / "spikegpt-model.md"  # real English text, one document per line
QUIET = ["--progress_bar", "false", "--accelerator", "cpu", "--devices", "1", "--precision", "32-true"]


def test_loss_of_a_tiny_model_falls_on_real_text():
    dm = TextDataModule([str(TEXT)], context_length=32, batch_size=8, tokenizer=str(TOKENIZER))
    dm.setup()
    torch.manual_seed(0)
    model, _ = build_base("scratch", "tiny")
    module = SpikeGPTLanguageModel(model, torch.ones(model.config.vocab_size, dtype=torch.int64))
    module.log = lambda *a, **k: None  # no trainer attached
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = next(iter(dm.train_dataloader()))
    losses = []
    for _ in range(8):
        loss = module.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[0] > 9 and losses[-1] < losses[0] - 1.0, losses  # ~ln(50277) = 10.8 at the start


def test_windows_never_cross_the_document_split(tmp_path):
    """Each document a line of its own token; every window's tokens come from its own split's documents."""
    tokenizer = load_tokenizer(TOKENIZER)
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()
    assert len({tokenizer.encode(" " + w).ids[0] for w in words}) == len(words)  # a token of its own per word
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(" ".join([w] * 7) for w in words) + "\n")
    dm = TextDataModule([str(corpus)], context_length=5, val_fraction=0.2, test_fraction=0.2, tokenizer=str(TOKENIZER))
    dm.setup()
    for name, docs in dm.documents.items():
        allowed = {t for d in docs for t in tokenizer.encode(d).ids} | {0}  # 0: the end-of-document token
        for window in dm.splits[name]["input_ids"]:
            assert set(window) <= allowed, (name, window)
    assert sum(len(d) for d in dm.documents.values()) == len(words)
    assert not set(dm.documents["train"]) & (set(dm.documents["validation"]) | set(dm.documents["test"]))


def test_pack_windows_overlap_by_one_and_cover_every_target_once():
    windows = pack_windows([[5, 6, 7], [8, 9]], context_length=3, eos_id=0)
    assert windows == [[5, 6, 7, 0], [0, 8, 9, 0]]
    targets = [t for w in windows for t in w[1:]]
    assert targets == [6, 7, 0, 8, 9, 0]


def test_empty_and_undecodable_text_files_are_clear_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no text"):
        TextDataModule([str(empty)], tokenizer=str(TOKENIZER)).setup()
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x80\n\x81\x82\n")
    with pytest.raises(ValueError, match="is not utf-8 text"):
        TextDataModule([str(binary)], tokenizer=str(TOKENIZER)).setup()
    with pytest.raises(ValueError, match="needs text"):
        TextDataModule(None, tokenizer=str(TOKENIZER))


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory):
    """A tiny LM pretrained on real text, then a pointwise-SpikeLoRA LM run on top of it."""
    root = tmp_path_factory.mktemp("lm")
    common = ["--task", "lm", "--text", str(TEXT), "--context_length", "32", "--batch_size", "8", *QUIET]
    base = root / "base"
    assert (
        train_main([*common, "--adapter", "none", "--model", "tiny", "--epochs", "2", "--output_dir", str(base)]) == 0
    )
    adapted = root / "adapted"
    argv = [
        *common,
        "--adapter",
        "spikelora",
        "--gate",
        "pointwise",
        "--base",
        str(base / "model.pth"),
        "--epochs",
        "1",
    ]
    assert train_main([*argv, "--output_dir", str(adapted)]) == 0
    return base, adapted


def test_lm_run_exports_an_official_state_dict_that_reloads_bit_exactly(lm_runs):
    base, _ = lm_runs
    sd = torch.load(base / "model.pth", map_location="cpu", weights_only=True)
    official = torch.load(FIXTURES / "f1_model.pth", map_location="cpu", weights_only=True)
    assert set(sd) == set(official)  # the official key names (the fixture is a same-depth official model)
    reloaded = load_model(base / "model.pth")
    trained, config = load_run(base)
    assert config.is_lm and config.adapter == "none"
    assert all(
        torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), trained.state_dict().values(), strict=True)
    )
    metrics = json.loads((base / "metrics.json").read_text())
    assert metrics["epochs"][1]["train_loss"] < metrics["epochs"][0]["train_loss"]
    assert {"test_loss", "test_ppl", "test_bpb"} <= set(metrics) and metrics["epochs"][0]["tokens_per_s"] > 0


def test_recurrent_and_parallel_perplexity_agree(lm_runs):
    for run in lm_runs:
        model, config = load_run(run)
        windows = evaluation.lm_test_windows(config, str(run))
        lengths = token_byte_lengths(load_tokenizer(TOKENIZER), model.config.vocab_size)
        parallel = evaluation.perplexity(model, windows, lengths, "parallel")
        recurrent = evaluation.perplexity(model, windows, lengths, "recurrent")
        assert parallel.tokens == recurrent.tokens > 0
        assert abs(parallel.ppl - recurrent.ppl) <= 1e-4 * parallel.ppl
        assert parallel.bpb == pytest.approx(parallel.loss / 0.6931471805599453 * parallel.tokens / int(
            sum(lengths[t] for w in windows for t in w[1:])), rel=1e-9)  # fmt: skip


def test_adapter_lm_run_generates_and_evaluates(lm_runs, capsys):
    _, adapted = lm_runs
    config = RunConfig.read(adapted / "run_config.json")
    assert config.weights == ["adapter.safetensors"] and config.gate == "pointwise"
    argv = ["--checkpoint", str(adapted), "--generate", "The model", "--max_tokens", "8", "--temperature", "0"]
    assert infer_main(argv) == 0
    assert capsys.readouterr().out.startswith("The model")
    assert infer_main(["--checkpoint", str(adapted), "--evaluate", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["relative_ppl_gap"] <= 1e-4 and result["windows"] > 0
