"""Training: padding-free read-out, real train.py runs (every adapter, resume, 2-process DDP), run checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT as REPO
from helpers import toy_split

from spikegpt_ft import adapters as ad
from spikegpt_ft.cli.train import main
from spikegpt_ft.data import TaskDataModule, load_tokenizer
from spikegpt_ft.runs import load_run
from spikegpt_ft.training import Optimization, SpikeGPTClassifier, build_base, build_classifier, last_token_logits


def classifier(adapter: str, rank: int = 8, base: str = "scratch", preset: str | None = "tiny"):
    """A 2-class classifier on a scratch tiny base (or ``base``), with ``adapter`` (none = full)."""
    model, info = build_base(base, preset)
    config = None if adapter == "none" else ad.AdapterConfig(kind=adapter, rank=rank)
    return build_classifier(model, 2, config), info


#: A few hundred Subj sentences on the tiny scratch model: enough to beat chance in seconds.
QUICK = [
    "--config", str(REPO / "configs" / "quickstart.yaml"), "--max-train-samples", "1200",
    "--max-eval-samples", "200", "--batch-size", "16", "--lr", "1e-2", "--progress-bar", "false",
    "--log-every-n-steps", "10",
]  # fmt: skip

KEYS = {
    "test_accuracy", "val_accuracy", "test_sparsity", "trainable_params", "total_params", "epoch_time_s",
    "peak_memory_mb", "base", "task", "adapter", "seed", "epochs", "protocol", "gate", "selected_epoch",
}  # fmt: skip


def train(args: list[str], timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout, **kw,
    )  # fmt: skip


def _texts(shared):
    tok = load_tokenizer(shared / "tokenizer" / "20B_tokenizer.json")
    sentences = [
        "a",
        "the film is a quiet , moving portrait of grief .",
        "dull",
        "it is what it is , no more and no less",
    ]
    return [tok.encode(s).ids for s in sentences]


@pytest.mark.parametrize("adapter", ["none", "spikelora"])
def test_padding_never_influences_a_prediction(shared, adapter):
    torch.manual_seed(0)
    model, _ = classifier(adapter)
    if adapter != "none":
        with torch.no_grad():
            for m in ad.adapter_modules(model).values():
                m.lora_B.normal_(0, 0.5)  # make the adapters matter
    model.eval()
    seqs = _texts(shared)
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.full((len(seqs), int(lengths.max()) + 3), 1)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    mask = torch.arange(ids.shape[1]) < lengths[:, None]
    batched_meter, alone_meter = ad.SparsityMeter(model), ad.SparsityMeter(model)
    with torch.no_grad():
        with batched_meter.recording(mask):
            batched = last_token_logits(model, ids, lengths)
        alone = []
        for s in seqs:
            x = torch.tensor([s])
            with alone_meter.recording():
                alone.append(last_token_logits(model, x, torch.tensor([len(s)])))
    torch.testing.assert_close(batched, torch.cat(alone), rtol=0, atol=1e-5)
    if adapter != "none":  # the sparsity count sees the real tokens only
        assert torch.equal(batched_meter.counts(), alone_meter.counts())


def test_training_step_checks_ids_on_the_host_and_never_syncs(monkeypatch):
    """Out-of-vocabulary ids are refused before the batch is copied to the device; the step itself then
    runs without the range check, and nothing in it (forward, loss, the running train loss, backward)
    reads a tensor's value on the host, which on a GPU would be a host-device sync."""
    torch.manual_seed(0)
    model, _ = classifier("lora")
    module = SpikeGPTClassifier(model, 2)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 5))
    batch = {"input_ids": ids, "lengths": torch.tensor([5, 3]), "mask": torch.ones(2, 5, dtype=torch.bool),
             "labels": torch.tensor([0, 1])}  # fmt: skip
    assert module.on_before_batch_transfer(batch, 0) is batch
    bad = {**batch, "input_ids": ids.clone().index_fill_(1, torch.tensor([2]), vocab)}
    with pytest.raises(ValueError, match=f"token id {vocab} is outside the vocabulary"):
        module.on_before_batch_transfer(bad, 0)

    def no_sync(*args, **kwargs):
        raise AssertionError("the training step read token-id bounds (a host sync on a GPU)")

    def host_read(*args, **kwargs):
        raise AssertionError("the training step read a tensor's value on the host (a host sync on a GPU)")

    monkeypatch.setattr(module, "log", lambda *a, **k: None)  # no trainer attached
    with monkeypatch.context() as patched:
        patched.setattr(torch, "aminmax", no_sync)
        for read in ("__bool__", "__float__", "__int__", "__index__", "item", "tolist"):
            patched.setattr(torch.Tensor, read, host_read)
        loss = module.training_step(batch, 0)
        loss.backward()
    assert torch.isfinite(loss)
    assert module.train_loss.compute() == loss.detach()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n and not n.startswith("head"))


def test_running_train_loss_is_torchmetrics_weighted_mean():
    """The training loss's running mean (updated with no host read) gives MeanMetric's weighted mean and keeps
    its state names, so checkpoints written with either load into the other."""
    from torchmetrics import MeanMetric

    from spikegpt_ft.training import RunningMean

    ours, reference = RunningMean(), MeanMetric()
    for loss, n in [(0.7, 32), (0.4, 32), (1.3, 5)]:
        ours.update(torch.tensor(loss), torch.tensor(float(n)))
        reference.update(torch.tensor(loss), weight=n)
    assert torch.allclose(ours.compute(), reference.compute())
    assert torch.allclose(ours.compute(), torch.tensor((0.7 * 32 + 0.4 * 32 + 1.3 * 5) / 69))
    ours.persistent(True)
    reference.persistent(True)
    assert ours.state_dict().keys() == reference.state_dict().keys()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One real train.py run per adapter (module-wide, shared by the tests below)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for adapter in ("none", "lora", "spikelora"):
        started = time.perf_counter()
        res = train([*QUICK, "--adapter", adapter, "--epochs", "3", "--output-dir", str(root / adapter)])
        assert res.returncode == 0, res.stderr[-3000:]
        out[adapter] = (root / adapter, time.perf_counter() - started)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["none", "lora", "spikelora"])
def test_end_to_end_fine_tune(runs, adapter):
    run_dir, _ = runs[adapter]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert KEYS <= set(metrics)
    assert metrics["task"] == "subj" and metrics["adapter"] == adapter and metrics["seed"] == 0
    assert metrics["base"] == "scratch:tiny:rwkv"
    assert metrics["test_accuracy"] > 0.6 and metrics["val_accuracy"] > 0.6, metrics  # chance is 0.5
    # every epoch is reported, also when the best one (tested) was not the last
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1, 2] and all("gen_gap" in e for e in metrics["epochs"])
    assert metrics["val_accuracy"] == max(e["val_accuracy"] for e in metrics["epochs"])
    assert metrics["splits"] == {"train": 1200, "validation": 200, "test": 200}
    assert metrics["trainable_params"] < metrics["total_params"] if adapter != "none" else True
    assert metrics["protocol"] == "default" and metrics["gate"] == ("temporal" if adapter == "spikelora" else None)
    if adapter == "spikelora":
        assert 0 < metrics["test_sparsity"] < 1 and "blocks.0.att.key" in metrics["test_sparsity_per_module"]
    else:
        assert metrics["test_sparsity"] is None
    if adapter == "none":
        assert metrics["trainable_params"] == metrics["total_params"]
    for name in ("last.ckpt", "best.ckpt", "run_config.json", "model.safetensors"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "adapter.safetensors").is_file() == (adapter != "none")
    assert list(run_dir.glob("logs/version_0/metrics.csv"))
    model, info = load_run(run_dir)
    assert info.task == "subj" and info.labels == ["objective", "subjective"] and info.adapter == adapter
    assert not model.training
    # infer.py on the run: held-out sentences classified token by token and in parallel, the same answers
    evaluated = subprocess.run(
        [sys.executable, str(REPO / "infer.py"), "--checkpoint", str(run_dir), "--evaluate", "--json",
         "--max-eval-samples", "200"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert report["n"] == 200 and report["agreement"] >= 0.999
    assert report["recurrent_accuracy"] == report["parallel_accuracy"] > 0.6, report  # chance is 0.5


@pytest.mark.slow
def test_resume_continues_exactly(runs, tmp_path):
    """Kill a run after its first epoch, resume it: same figures as the uninterrupted run.

    With a loader worker process, which draws the batch order as soon as its iterator is made, i.e.
    before Lightning sets the epoch of a resumed fit: the data order must come from the checkpoint."""
    run_dir = tmp_path / "resumed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [*QUICK, "--adapter", "lora", "--epochs", "3", "--num-workers", "1", "--output-dir", str(run_dir)]
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 180
    while not (run_dir / "last.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run_dir / "last.ckpt").is_file() and not (run_dir / "metrics.json").exists()
    # starting again without --resume would lose the run: refused
    again = train(args)
    assert again.returncode != 0 and "--resume" in again.stderr
    res = train([*args, "--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = json.loads((run_dir / "metrics.json").read_text())
    reference = json.loads((runs["lora"][0] / "metrics.json").read_text())
    for a, b in zip(resumed["epochs"], reference["epochs"], strict=True):
        for key in ("train_loss", "val_loss", "val_accuracy", "lr"):
            assert a[key] == pytest.approx(b[key], rel=0, abs=1e-6), (key, a, b)
    assert resumed["test_accuracy"] == pytest.approx(reference["test_accuracy"], abs=1e-6)
    # honest times: the resumed process says it resumed; the training time spans every epoch, not only its own
    assert resumed["resumed"] is True and reference["resumed"] is False
    assert resumed["train_time_s"] == pytest.approx(sum(e["epoch_time_s"] for e in resumed["epochs"]))
    assert len(resumed["epochs"]) == 3 and all(e["epoch_time_s"] > 0 for e in resumed["epochs"])


class _Interrupt(Exception):
    pass


def _fit_toy(root: Path, stop_at_step: int | None = None, resume: bool = False):
    """Two epochs of the real classifier (tiny scratch model, dropout on) on 40 toy sentences, batch 4,
    checkpointing every 3 steps; ``stop_at_step`` interrupts it before that step. Returns the module and
    the first token of every example of every batch trained on."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from spikegpt_ft.data import make_loader

    seen: list[list[int]] = []

    class Watch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == stop_at_step:
                raise _Interrupt
            seen.append(batch["input_ids"][:, 0].tolist())

    L.seed_everything(0, verbose=False)
    model, _ = classifier("lora", rank=4)
    module = SpikeGPTClassifier(model, 2, Optimization(lr=1e-2, warmup_ratio=0.1), seed=0)
    split = toy_split(40)
    split = split.map(lambda e: {"input_ids": [i % 1000 for i in e["input_ids"]]})
    trainer = L.Trainer(
        default_root_dir=root, max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, gradient_clip_val=1.0,
        callbacks=[Watch(), ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=0, save_last=True)],
    )  # fmt: skip
    loaders = make_loader(split, 4, shuffle=True, seed=0), make_loader(split, 8, shuffle=False)
    trainer.fit(module, *loaders, ckpt_path=str(root / "last.ckpt") if resume else None)
    return module, seen


def test_resume_in_the_middle_of_an_epoch_continues_exactly(tmp_path):
    """Interrupted mid-epoch (step 16 of 2 x 10, last checkpoint at step 15): the resumed fit trains on
    the remaining batches of that epoch in the same order with the same dropout, and ends with the same
    weights, optimizer and history as the uninterrupted fit."""
    reference, ref_seen = _fit_toy(tmp_path / "ref")
    assert len(ref_seen) == 20 and ref_seen[:10] != ref_seen[10:]
    with pytest.raises(_Interrupt):
        _fit_toy(tmp_path / "cut", stop_at_step=16)
    resumed, seen = _fit_toy(tmp_path / "cut", resume=True)
    assert seen == ref_seen[15:]
    for (name, a), b in zip(resumed.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert [h["epoch"] for h in resumed.history] == [0, 1]
    for a, b in zip(resumed.history, reference.history, strict=True):
        for key in ("train_loss", "val_loss", "val_accuracy", "lr"):
            assert a[key] == pytest.approx(b[key], rel=0, abs=1e-6), key


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path):
    run_dir = tmp_path / "ddp"
    args = [*QUICK, "--adapter", "spikelora", "--epochs", "1", "--max-train-samples", "320"]
    args += ["--output-dir", str(run_dir)]
    res = train([*args, "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"])
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert KEYS <= set(metrics) and metrics["world_size"] == 2 and 0 <= metrics["test_accuracy"] <= 1
    assert 0 < metrics["test_sparsity"] < 1 and (run_dir / "adapter.safetensors").is_file()
    # the figures cover the whole test set, not rank 0's share: the saved classifier, evaluated in one
    # process on the same 200 sentences, gives the same accuracy and sparsity
    model, _ = load_run(run_dir)
    dm = TaskDataModule("subj", seed=0, max_train_samples=320, max_eval_samples=200)
    dm.setup()
    right, n = 0, 0
    meter = ad.SparsityMeter(model)
    with torch.no_grad():
        for batch in dm.test_dataloader():
            with meter.recording(batch["mask"]):
                logits = last_token_logits(model, batch["input_ids"], batch["lengths"])
            right += int((logits.argmax(-1) == batch["labels"]).sum())
            n += len(batch["labels"])
    assert n == 200 and right / n == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert meter.result()["mean"] == pytest.approx(metrics["test_sparsity"], abs=1e-6)


def test_bad_cli_input_is_explained(capsys, tmp_path):
    assert main(["--task", "imdb", "--adapter", "lora"]) == 2
    err = capsys.readouterr().err
    assert "imdb" in err and "subj" in err and "sst5" in err
    assert main(["--task", "subj", "--adapter", "dora"]) == 2
    err = capsys.readouterr().err
    assert "none" in err and "spikelora" in err
    assert main([*QUICK, "--adapter", "lora", "--output-dir", str(tmp_path / "x"), "--resume", "true"]) == 2
    assert "last.ckpt to continue" in capsys.readouterr().err
    status = main(["--task", "subj", "--adapter", "lora", "--base", str(tmp_path / "none.pth"), "--output-dir",
                   str(tmp_path / "y")])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and "none.pth" in err and "ridger/SpikeGPT-OpenWebText-216M" in err and "Traceback" not in err
    assert not (tmp_path / "y").exists()


def _official_like(path: Path, seed: int) -> Path:
    from helpers import tiny_model

    torch.save(tiny_model(vocab=50277, n_embd=16, n_layer=1, seed=seed).state_dict(), path)
    return path


def test_load_run_checks_kind_and_base(tmp_path):
    from dataclasses import asdict

    from spikegpt_ft.runs import RunConfig, export_run

    base = _official_like(tmp_path / "base.pth", 0)
    other = _official_like(tmp_path / "other.pth", 1)
    model, info = classifier("lora", rank=4, base=str(base), preset=None)
    with torch.no_grad():
        for m in ad.adapter_modules(model).values():
            m.lora_B.normal_()
    cfg = RunConfig(
        task="sst2", labels=["negative", "positive"], adapter="lora", base=info.base, base_path=info.base_path,
        base_fingerprint=info.fingerprint, model_config=asdict(model.config), tokenizer="x", seed=0,
        weights=["adapter.safetensors"],
    )  # fmt: skip
    run = tmp_path / "run"
    export_run(model, run, cfg)
    assert (run / "adapter.safetensors").is_file() and not (run / "model.safetensors").exists()
    loaded, meta = load_run(run)  # the recorded base path
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(loaded(ids), model.eval()(ids))
    assert meta.labels == ["negative", "positive"]
    loaded, _ = load_run(run / "adapter.safetensors", base=base)
    with pytest.raises(ValueError, match="not the base these adapters were trained on"):
        load_run(run, base=other)
    (tmp_path / "x.ckpt").write_bytes(b"0")
    with pytest.raises(ValueError, match="Lightning training checkpoint"):
        load_run(tmp_path / "x.ckpt")
    with pytest.raises(FileNotFoundError, match="not a spikegpt-ft run directory"):
        load_run(tmp_path)
    os.remove(base)
    with pytest.raises(FileNotFoundError, match="pass that base with --base"):
        load_run(run)
