"""The comparison report: mean ± std over seeds, published rows, the chart, and bad input."""

from __future__ import annotations

import json
import statistics

import pytest

from spikegpt_ft import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(root, relative, **metrics):
    path = root / relative / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    defaults = {
        "val_accuracy": 0.9,
        "sparsity": 0.8,
        "trainable_params": 1000,
        "total_params": 200000,
        "epoch_time_s": 12.5,
        "peak_memory_mb": 512.0,
        "base": "/models/SpikeGPT-216M.pth",
    }
    path.write_text(json.dumps({**defaults, **metrics}))
    return path


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "subj/spikelora/seed0", task="subj", adapter="spikelora", seed=0, test_accuracy=0.9)
    write_run(root, "subj/spikelora/seed1", task="subj", adapter="spikelora", seed=1, test_accuracy=0.92)
    write_run(root, "deeper/still/subj-lora-0", task="subj", adapter="lora", seed=0, test_accuracy=0.885)
    write_run(root, "subj/lora/1", task="subj", adapter="lora", seed=1, test_accuracy=0.9, epoch_time_s=13.5)
    write_run(root, "subj/lora/2", task="subj", adapter="lora", seed=2, test_accuracy=0.871)
    write_run(root, "sst2/none/0", task="sst2", adapter="none", seed=0, test_accuracy=0.8, base="tiny.pth")
    bad = root / "subj" / "broken" / "metrics.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    write_run(root, "subj/noacc", task="subj", adapter="lora", seed=9, test_accuracy=None)
    return root


def table_rows(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines() if line.startswith("| ")]


def test_report_mean_std_published_rows_and_png(runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([str(runs), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "broken/metrics.json" in err and "noacc/metrics.json" in err and "warning" in err

    md = (out / "report.md").read_text()
    rows = table_rows(md)
    header, body = rows[0], rows[1:]
    col = {name: i for i, name in enumerate(header)}
    by_key = {(r[col["Task"]], r[col["Method"]], r[col["Source"]].split(" (")[0]): r for r in body}

    for method, accs in (("SpikeLoRA", [0.9, 0.92]), ("LoRA", [0.885, 0.9, 0.871])):
        expected = f"{100 * statistics.mean(accs):.2f} ± {100 * statistics.stdev(accs):.2f}"
        row = by_key[("subj", method, "measured here")]
        assert row[col["Test acc. (%)"]] == expected
        assert row[col["Seeds"]] == str(len(accs))
        assert row[col["Base"]] == "SpikeGPT-216M.pth"
    assert by_key[("subj", "SpikeLoRA", "measured here")][col["Test acc. (%)"]] == "91.00 ± 1.41"
    assert by_key[("subj", "LoRA", "measured here")][col["Time / epoch (s)"]] == f"{(12.5 + 13.5 + 12.5) / 3:.1f}"
    assert by_key[("subj", "LoRA", "measured here")][col["Sparsity (%)"]] == "80.00"
    assert by_key[("subj", "LoRA", "measured here")][col["Trainable params"]] == "1,000 (0.50 %)"
    full = by_key[("sst2", "Full fine-tuning", "measured here")]
    assert full[col["Test acc. (%)"]] == "80.00 ± –" and full[col["Base"]] == "tiny.pth"

    published = {k[1]: r for k, r in by_key.items() if k[2] == "published"}
    assert {m: r[col["Test acc. (%)"]] for m, r in published.items()} == {
        "SpikeGPT trained from scratch": "89.10",
        "Full fine-tuning": "95.30",
        "LoRA": "90.70",
        "SpikeLoRA": "91.10",
    }
    assert all(r[col["Task"]] == "subj" and "Table 4" in r[col["Source"]] for r in published.values())
    assert len(body) == 4 + 3  # the malformed runs are not rows
    # within subj the published rows come first, clearly apart from the measured ones
    subj_sources = [r[col["Source"]].split(" (")[0] for r in body if r[col["Task"]] == "subj"]
    assert subj_sources == ["published"] * 4 + ["measured here"] * 2

    png = (out / "report.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000
    import matplotlib.image

    assert matplotlib.image.imread(out / "report.png").ndim == 3


def test_report_defaults_to_the_runs_dir(runs, capsys):
    assert report.main([str(runs)]) == 0
    assert (runs / "report.md").is_file() and (runs / "report.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("case", ["missing", "empty", "only_malformed", "a_file"])
def test_report_bad_input_is_a_clear_error(case, tmp_path, capsys):
    target = tmp_path / "runs"
    if case == "empty":
        target.mkdir()
    elif case == "only_malformed":
        (target / "a").mkdir(parents=True)
        (target / "a" / "metrics.json").write_text("[1, 2]")
    elif case == "a_file":
        target.write_text("x")
    with pytest.raises(SystemExit) as exit_:
        report.main([str(target)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    expected = {
        "missing": "runs directory not found",
        "empty": "no metrics.json found",
        "only_malformed": "none of the 1 metrics.json",
        "a_file": "not a directory",
    }[case]
    assert f"error: {expected}" in err and "Traceback" not in err
    if case == "only_malformed":
        assert "a/metrics.json" in err
