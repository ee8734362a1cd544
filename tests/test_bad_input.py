"""Bad input never costs a run, a traceback or a silent wrong answer.

Each row runs a program (in-process) on one bad input and asserts its exit status, that the message names
the culprit, that no traceback was printed, and that the run directory it was pointed at is byte for byte
what it was before.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import SHARED

from spikegpt_ft.cli.infer import main as infer_main
from spikegpt_ft.cli.train import main as train_main

QUICK = ["--task", "subj", "--base", "scratch", "--model", "tiny", "--max_train_samples", "64",
         "--max_eval_samples", "32", "--epochs", "1", "--batch_size", "16", "--progress_bar", "false",
         "--accelerator", "cpu", "--devices", "1"]  # fmt: skip


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished LoRA run (the directory the bad inputs must not harm)."""
    run = tmp_path_factory.mktemp("bad") / "run"
    assert train_main([*QUICK, "--adapter", "lora", "--output_dir", str(run)]) == 0
    return run


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def _subj_copy(tmp_path: Path) -> Path:
    data = tmp_path / "subj"
    shutil.copytree(SHARED / "data" / "subj", data)
    return data


def _sst2_copy(tmp_path: Path) -> Path:
    data = tmp_path / "sst2"
    shutil.copytree(SHARED / "data" / "sst2", data)
    return data


def check(capsys, program: Callable[[list[str]], int], argv: list[str], watched: Path, culprit: str, status: int = 2):
    before = snapshot(watched) if watched.exists() else None
    code = program(argv)
    out, err = capsys.readouterr()
    assert code == status, (code, err[-2000:])
    assert culprit in err, err[-2000:]
    assert "Traceback" not in err + out
    assert (snapshot(watched) if watched.exists() else None) == before


# --- train.py ----------------------------------------------------------------------------------------


def test_overwrite_with_a_bad_option_keeps_the_old_run(capsys, run_copy):
    check(capsys, train_main, [*QUICK, "--adapter", "lora", "--overwrite", "true", "--rank", "0",
                               "--output_dir", str(run_copy)], run_copy, "rank")  # fmt: skip


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_resume_from_a_damaged_checkpoint(capsys, run_copy, damage):
    last = run_copy / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2] if damage == "truncated" else bytes(range(256)) * 8)
    check(capsys, train_main, [*QUICK, "--adapter", "lora", "--resume", "true", "--output_dir", str(run_copy)],
          run_copy, str(last))  # fmt: skip


def test_a_class_file_without_text(capsys, tmp_path):
    data = _subj_copy(tmp_path)
    (data / "subj.objective").write_text("\n\n   \n")
    out = tmp_path / "new"
    check(capsys, train_main, [*QUICK, "--adapter", "lora", "--data_dir", str(data), "--output_dir", str(out)],
          out, "subj.objective")  # fmt: skip
    assert not out.exists()


def test_an_empty_sst_dev_file(capsys, tmp_path):
    data = _sst2_copy(tmp_path)
    (data / "stsa.binary.dev").write_bytes(b"")
    out = tmp_path / "new"
    argv = [*QUICK, "--task", "sst2", "--adapter", "lora", "--data_dir", str(data), "--output_dir", str(out)]
    check(capsys, train_main, argv, out, "stsa.binary.dev")
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, culprit",
    [
        (["--epochs", "0"], "epochs"),
        (["--batch_size", "0"], "batch size"),
        (["--resume", "true", "--overwrite", "true"], "--resume"),
        (["--lr", "-1"], "lr"),
        (["--gate", "sometimes"], "gate"),
        (["--seeds", "0,x"], "seeds"),
        (["--model", "huge"], "huge"),
        (["--base", "/nonexistent/base.pth"], "/nonexistent/base.pth"),
        (["--text", "x.txt"], "--text"),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(capsys, run_copy, flags, culprit):
    check(capsys, train_main, [*QUICK, "--adapter", "lora", "--overwrite", "true", "--output_dir", str(run_copy),
                               *flags], run_copy, culprit)  # fmt: skip


def test_a_run_directory_is_never_started_over_silently(capsys, run_copy):
    check(capsys, train_main, [*QUICK, "--adapter", "lora", "--output_dir", str(run_copy)], run_copy, "already holds")


def test_usage_errors_exit_2(capsys, tmp_path):
    check(capsys, train_main, ["--task", "subj", "--no-such-flag", "1"], tmp_path, "no_such_flag")
    check(capsys, train_main, ["--adapter", "lora"], tmp_path, "task")


# --- infer.py ----------------------------------------------------------------------------------------


def test_a_run_config_whose_labels_do_not_fit_the_head(capsys, run_copy):
    path = run_copy / "run_config.json"
    config = json.loads(path.read_text())
    config["labels"] = ["a", "b", "c"]
    path.write_text(json.dumps(config))
    check(capsys, infer_main, ["--checkpoint", str(run_copy), "--text", "hi"], run_copy, "3 labels")


@pytest.mark.parametrize(
    "content, culprit",
    [("[1, 2]", "JSON object"), ("{not json", "run_config.json"), (None, "weights")],
)
def test_malformed_run_configs_are_named(capsys, run_copy, content, culprit):
    path = run_copy / "run_config.json"
    if content is None:
        config = json.loads(path.read_text())
        config["weights"] = ["../x"]
        content = json.dumps(config)
    path.write_text(content)
    check(capsys, infer_main, ["--checkpoint", str(run_copy), "--text", "hi"], run_copy, culprit)


def test_a_truncated_weight_file_is_named(capsys, run_copy):
    weights = run_copy / "model.safetensors"  # a scratch-base run: the whole model is the file that is read
    weights.write_bytes(weights.read_bytes()[:100])
    check(capsys, infer_main, ["--checkpoint", str(run_copy), "--text", "hi"], run_copy, "model.safetensors")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_sampling_values_are_refused(capsys, run_copy, value):
    check(capsys, infer_main, ["--checkpoint", str(run_copy), "--generate", "x", f"--temperature={value}"], run_copy,
          "finite")  # fmt: skip


def test_evaluate_with_a_zero_batch_size(capsys, run_copy):
    check(capsys, infer_main, ["--checkpoint", str(run_copy), "--evaluate", "--batch_size", "0"], run_copy,
          "batch_size")  # fmt: skip


def test_a_moved_run_finds_the_tokenizer_where_training_looks(capsys, run_copy):
    path = run_copy / "run_config.json"
    config = json.loads(path.read_text())
    config["tokenizer"] = "/elsewhere/20B_tokenizer.json"
    path.write_text(json.dumps(config))
    before = snapshot(run_copy)
    assert infer_main(["--checkpoint", str(run_copy), "--text", "a fine film"]) == 0
    assert "objective" in capsys.readouterr().out and snapshot(run_copy) == before


def test_lora_reports_no_sparsity_rather_than_zero(finished):
    from spikegpt_ft.training.run import summary_line

    metrics = json.loads((finished / "metrics.json").read_text())
    assert metrics["test_sparsity"] is None and "sparsity –" in summary_line(metrics, finished)


def test_evaluate_uses_the_training_split_and_refuses_a_changed_one(capsys, tmp_path):
    """A run trained with --test_fraction 0.2 is evaluated on its own 20 % test split, and not at all once
    the data it was split from changed."""
    data = _subj_copy(tmp_path)
    run = tmp_path / "run"
    argv = [*QUICK, "--adapter", "none", "--test_fraction", "0.2", "--max_eval_samples", "400",
            "--data_dir", str(data), "--output_dir", str(run)]  # fmt: skip
    assert train_main(argv) == 0
    capsys.readouterr()
    assert infer_main(["--checkpoint", str(run), "--evaluate", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    metrics = json.loads((run / "metrics.json").read_text())
    assert result["n"] == metrics["splits"]["test"] == 400
    assert result["recurrent_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    with (data / "subj.subjective").open("a", encoding="latin-1") as f:
        f.write("one more subjective sentence , added after training .\n")
    check(capsys, infer_main, ["--checkpoint", str(run), "--evaluate"], run, "differs from the one it was trained")


def test_the_cost_of_recurrent_mode_on_long_texts_is_stated(capsys):
    """A 20k-token text takes minutes token by token on a CPU and seconds in parallel: --help says so."""
    assert infer_main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "grows with every token" in out and "parallel: the same answer" in out
