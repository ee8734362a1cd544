"""The comparison report: groups, placement beside the published rows, 95 % intervals, the chart, bad input."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from spikegpt_ft.tools import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PTH = "/models/SpikeGPT-216M.pth"
FP = "0123456789abcdef" * 4


def write_run(root, relative, **metrics):
    path = root / relative / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    defaults = {
        "protocol": "spikelora-paper",
        "gate": None,
        "val_accuracy": 0.9,
        "test_sparsity": 0.8,
        "trainable_params": 1000,
        "total_params": 200000,
        "epoch_time_s": 12.5,
        "peak_memory_mb": 512.0,
        "base": PTH,
        "base_fingerprint": FP,
        "splits": {"train": 8000, "validation": 1000, "test": 1000},
    }
    path.write_text(json.dumps({**defaults, **metrics}))
    return path


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for seed, acc in enumerate([0.9, 0.92]):
        write_run(root, f"subj/spikelora/{seed}", task="subj", adapter="spikelora", gate="temporal", seed=seed,
                  test_accuracy=acc)  # fmt: skip
    # the same adapter with another gate, and under another protocol: groups of their own
    write_run(root, "subj/spikelora-pw/0", task="subj", adapter="spikelora", gate="pointwise", seed=0,
              test_accuracy=0.5)  # fmt: skip
    write_run(root, "deeper/still/subj-lora-0", task="subj", adapter="lora", seed=0, test_accuracy=0.885)
    write_run(root, "subj/lora/1", task="subj", adapter="lora", seed=1, test_accuracy=0.9, epoch_time_s=13.5)
    write_run(root, "subj/lora/2", task="subj", adapter="lora", seed=2, test_accuracy=0.871)
    write_run(root, "subj/lora-other/0", task="subj", adapter="lora", protocol="default", seed=0, test_accuracy=0.6)
    write_run(root, "subj/full/0", task="subj", adapter="none", seed=0, test_accuracy=0.80,
              splits={"train": 8000, "test": 500})  # fmt: skip
    write_run(root, "subj/scratch/0", task="subj", adapter="none", seed=0, test_accuracy=0.885,
              base="scratch:nlu-12x512", base_fingerprint="ffff" * 16)  # fmt: skip
    write_run(root, "subj/scratch-lora/0", task="subj", adapter="lora", seed=0, test_accuracy=0.7,
              base="scratch:tiny", base_fingerprint="eeee" * 16)  # fmt: skip
    write_run(root, "sst2/none/0", task="sst2", adapter="none", seed=0, test_accuracy=0.8)
    write_run(root, "lm/0", task="lm", adapter="lora", seed=0, test_loss=3.5, test_ppl=33.1, test_bpb=1.2,
              test_accuracy=None)  # fmt: skip
    write_run(root, "lm/1", task="lm", adapter="lora", seed=1, test_loss=3.7, test_ppl=40.4, test_bpb=1.3,
              test_accuracy=None)  # fmt: skip
    bad = root / "subj" / "broken" / "metrics.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    write_run(root, "subj/noacc", task="subj", adapter="lora", seed=9, test_accuracy=None)
    return root


def tables(md: str) -> list[list[list[str]]]:
    """Every Markdown table of ``md``: its rows (header first, the --- line left out) as lists of cells."""
    out, current = [], None
    for line in md.splitlines():
        if line.startswith("|"):
            if line.startswith("|---"):
                continue
            if current is None:
                current = []
                out.append(current)
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        else:
            current = None
    return out


def _main_table(runs, tmp_path):
    out = tmp_path / "out"
    assert report.main([str(runs), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    header, *body = tables(md)[0]
    col = {name: i for i, name in enumerate(header)}
    return md, out, col, body


def test_wilson_interval_against_hand_values():
    # 85 of 100: p = 0.85, z^2 = 3.8415, centre (0.85 + 0.019207) / 1.038415 = 0.837050,
    # half 1.959964 / 1.038415 * sqrt(0.1275 / 100 + 3.8415 / 40000) = 0.069888
    lo, hi = report.wilson_interval(85, 100)
    assert lo == pytest.approx(0.767164, abs=3e-6) and hi == pytest.approx(0.906940, abs=3e-6)
    # 0 of 10: the lower bound is 0 and the upper z^2 / (n + z^2) = 3.8415 / 13.8415
    assert report.wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=2e-6)
    with pytest.raises(ValueError):
        report.wilson_interval(11, 10)


def test_t_interval_over_seeds():
    # two seeds 90, 92: s = sqrt(2), t(0.975, 1) = 12.706 -> 91 +- 12.706
    assert report.t_interval([90.0, 92.0]) == pytest.approx((91 - 12.7062, 91 + 12.7062), abs=1e-4)
    # five seeds: t(0.975, 4) = 2.7764
    values = [88.0, 89.0, 90.0, 91.0, 92.0]
    half = 2.7764 * statistics.stdev(values) / math.sqrt(5)
    assert report.t_interval(values) == pytest.approx((90 - half, 90 + half))
    assert report.t_interval([90.0]) is None
    assert report.t_quantile(30) == pytest.approx(2.0423) and report.t_quantile(60) == pytest.approx(2.0003, abs=2e-4)


def test_report_groups_and_places_rows_beside_the_published_numbers(runs, tmp_path, capsys):
    md, out, col, body = _main_table(runs, tmp_path)
    err = capsys.readouterr().err
    assert "broken/metrics.json" in err and "noacc/metrics.json" in err and "warning" in err

    subj = [r for r in body if r[col["Task"]] == "subj"]
    what = [(r[col["Source"]].split(" (")[0], r[col["Method"]], r[col["Base"]], r[col["Protocol"]], r[col["Gate"]])
            for r in subj]  # fmt: skip
    pretrained = f"pretrained SpikeGPT-216M.pth ({FP[:12]})"
    assert what == [
        ("published", "SpikeGPT trained from scratch", "–", "–", "–"),
        ("measured here", "Trained from scratch", "scratch (nlu-12x512)", "spikelora-paper", "–"),
        ("published", "Full fine-tuning", "–", "–", "–"),
        ("measured here", "Full fine-tuning", pretrained, "spikelora-paper", "–"),
        ("published", "LoRA", "–", "–", "–"),
        ("measured here", "LoRA", pretrained, "default", "–"),
        ("measured here", "LoRA", pretrained, "spikelora-paper", "–"),
        ("published", "SpikeLoRA", "–", "–", "–"),
        ("measured here", "SpikeLoRA", pretrained, "spikelora-paper", "pointwise"),
        ("measured here", "SpikeLoRA", pretrained, "spikelora-paper", "temporal"),
        ("measured here", "LoRA", "scratch (tiny)", "spikelora-paper", "–"),
    ]
    published = {r[col["Method"]]: r[col["Test acc. (%)"]] for r in subj if r[col["Source"]].startswith("published")}
    assert published == {"SpikeGPT trained from scratch": "89.10", "Full fine-tuning": "95.30", "LoRA": "90.70",
                         "SpikeLoRA": "91.10"}  # fmt: skip
    # each measured row names the value it is compared with
    assert [r[col["Published (%)"]] for r in subj if r[col["Source"]] == "measured here"] == [
        "89.10", "95.30", "90.70", "90.70", "91.10", "91.10", "–"
    ]  # fmt: skip
    assert subj[-1][col["Published vs 95 % CI"]] == "no published counterpart: adapters on a random frozen base"
    sst2 = [r for r in body if r[col["Task"]] == "sst2"]
    assert len(sst2) == 1 and sst2[0][col["Published (%)"]] == "–"
    assert sst2[0][col["Published vs 95 % CI"]].startswith("no published counterpart")
    assert len(body) == len(subj) + 1  # the malformed and the language-model runs are not rows here

    pretrained_rows = [r for r in subj if r[col["Base"]] == pretrained]
    by = {(r[col["Method"]], r[col["Gate"]], r[col["Protocol"]]): r for r in pretrained_rows}
    for key, accs in ((("SpikeLoRA", "temporal", "spikelora-paper"), [0.9, 0.92]),
                      (("LoRA", "–", "spikelora-paper"), [0.885, 0.9, 0.871])):  # fmt: skip
        expected = f"{100 * statistics.mean(accs):.2f} ± {100 * statistics.stdev(accs):.2f}"
        assert by[key][col["Test acc. (%)"]] == expected and by[key][col["Seeds"]] == str(len(accs))
    lora = by[("LoRA", "–", "spikelora-paper")]
    assert lora[col["Time / epoch (s)"]] == f"{(12.5 + 13.5 + 12.5) / 3:.1f}"
    assert lora[col["Sparsity (%)"]] == "80.00" and lora[col["Trainable params"]] == "1,000 (0.50 %)"
    # seed interval of [88.5, 90.0, 87.1]: mean 88.5333, s 1.45029, t(2) 4.3027 -> 88.5333 +- 3.6028
    assert lora[col["95 % CI, seeds (t)"]] == "84.93–92.14 (n = 3 seeds)"
    # Wilson, 900 of 1000: centre 0.90192 / 1.0038415 = 0.898469, half 1.952464 * 0.0095373 = 0.018621
    assert "seed 1: 87.98–91.71 (n = 1000)" in lora[col["95 % CI, test texts (Wilson)"]]

    png = (out / "report.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000
    import matplotlib.image

    assert matplotlib.image.imread(out / "report.png").ndim == 3


def test_report_says_whether_the_published_value_is_inside_the_interval(runs, tmp_path):
    _, _, col, body = _main_table(runs, tmp_path)
    verdicts = {
        (r[col["Method"]], r[col["Gate"]], r[col["Protocol"]]): r[col["Published vs 95 % CI"]]
        for r in body
        if r[col["Source"]] == "measured here" and r[col["Task"]] == "subj" and r[col["Base"]] != "scratch (tiny)"
    }
    # full fine-tuning, one seed, 400 of 500: Wilson 76.27–83.27, far below 95.30; no seed interval
    assert verdicts[("Full fine-tuning", "–", "spikelora-paper")] == "test texts: outside the interval"
    # scratch, 885 of 1000: Wilson 86.37–90.33 holds 89.10
    assert verdicts[("Trained from scratch", "–", "spikelora-paper")] == "test texts: inside the interval"
    # LoRA 88.5 / 90.0 / 87.1 on 1000 texts each: only the 90.0 run's interval (87.98–91.71) holds 90.70;
    # the seed interval 84.93–92.14 does
    assert verdicts[("LoRA", "–", "spikelora-paper")] == (
        "seeds: inside the interval; test texts: inside the interval of 1 of 3 runs"
    )
    # SpikeLoRA temporal 90.0 / 92.0: t interval 78.29–103.71, Wilson 87.98–91.71 and 90.15–93.53 both hold 91.10
    assert verdicts[("SpikeLoRA", "temporal", "spikelora-paper")] == (
        "seeds: inside the interval; test texts: inside the interval"
    )
    # SpikeLoRA pointwise at 50 %: outside
    assert verdicts[("SpikeLoRA", "pointwise", "spikelora-paper")] == "test texts: outside the interval"


def test_report_spikegpt_nlu_and_language_model_tables(runs, tmp_path):
    md, *_ = _main_table(runs, tmp_path)
    _, nlu, lm = tables(md)
    assert nlu[0] == ["Task", "Model", "Test acc. (%)", "Source"]
    assert {r[0]: r[2] for r in nlu[1:]} == {"sst2": "88.76", "sst5": "51.27", "mr": "85.63", "subj": "95.30"}
    assert all("secondary source, not verified against the paper's PDF" in r[3] for r in nlu[1:])
    header, row = lm
    assert header[:4] == ["Adapter", "Protocol", "Base", "Seeds"] and row[3] == "2"
    assert row[4] == f"3.6000 ± {statistics.stdev([3.5, 3.7]):.4f}"
    assert row[5].startswith("36.75 ± ") and row[6].startswith("1.2500 ± ")


def test_report_defaults_to_the_runs_dir(runs, capsys):
    assert report.main([str(runs)]) == 0
    assert (runs / "report.md").is_file() and (runs / "report.png").read_bytes().startswith(PNG_MAGIC)
    assert report.build_parser().prog == "spikegpt-ft report"


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
