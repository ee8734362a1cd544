"""The data pipeline: the four original formats, splits, padding, and clear errors on bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import toy_split

from spikegpt_ft import data, paths
from spikegpt_ft.data import (
    PAD_ID,
    TASKS,
    BucketBatchSampler,
    ReadReport,
    build_splits,
    collate,
    find_data_dir,
    find_tokenizer,
    load_tokenizer,
    read_task,
    tokenize_splits,
)

EXPECTED = {
    "subj": {"all": 10000},
    "mr": {"all": 10662},
    "sst2": {"train": 6920, "dev": 872, "test": 1821},
    "sst5": {"train": 8544, "dev": 1101, "test": 2210},
}


@pytest.mark.parametrize("task", list(TASKS))
def test_reads_every_line_of_the_shared_data(shared, task):
    splits, report = read_task(task, shared / "data" / task)
    assert {k: len(v[0]) for k, v in splits.items()} == EXPECTED[task]
    assert report.skipped == 0
    for texts, labels in splits.values():
        assert len(texts) == len(labels) and all(t and t == t.strip() for t in texts)
        assert set(labels) == set(range(TASKS[task].n_classes))


def test_per_label_files_give_balanced_labels(shared):
    splits, _ = read_task("subj", shared / "data" / "subj")
    labels = splits["all"][1]
    assert labels.count(0) == labels.count(1) == 5000  # objective = 0, subjective = 1


def test_mr_is_read_as_latin1(shared):
    texts, _ = read_task("mr", shared / "data" / "mr")[0]["all"]
    raw_lines = (shared / "data" / "mr" / "rt-polarity.pos").read_bytes().split(b"\n")
    non_utf8 = [b for b in raw_lines if any(c >= 0x80 for c in b)]
    assert non_utf8, "the MR files hold Latin-1 bytes"
    assert non_utf8[0].decode("latin-1").strip() in texts
    # byte 0x85 (NEL in Latin-1) must not split a line: still 5331 per file
    assert len(texts) == 10662


def test_stratified_split_is_stratified_deterministic_and_disjoint(shared):
    a, _ = build_splits("subj", seed=3, data_dir=shared / "data" / "subj")
    b, _ = build_splits("subj", seed=3, data_dir=shared / "data" / "subj")
    c, _ = build_splits("subj", seed=4, data_dir=shared / "data" / "subj")
    assert {k: len(v) for k, v in a.items()} == {"train": 8100, "validation": 900, "test": 1000}
    for name in a:
        assert a[name]["text"] == b[name]["text"]
        labels = a[name]["label"]
        assert labels.count(0) == labels.count(1)  # 50/50 in every split
    assert a["test"]["text"] != c["test"]["text"]
    # disjoint and complete: the three splits together are exactly the corpus (as a multiset)
    from collections import Counter

    texts, labels = read_task("subj", shared / "data" / "subj")[0]["all"]
    together = Counter(p for n in a for p in zip(a[n]["text"], a[n]["label"], strict=True))
    assert together == Counter(zip(texts, labels, strict=True))
    assert a["train"].features["label"].names == ["objective", "subjective"]


def test_sst_keeps_its_own_splits(shared):
    splits, _ = build_splits("sst5", seed=0, data_dir=shared / "data" / "sst5")
    assert {k: len(v) for k, v in splits.items()} == {"train": 8544, "validation": 1101, "test": 2210}


def test_subsets_are_stratified(shared):
    splits, _ = build_splits("mr", seed=0, data_dir=shared / "data" / "mr", max_train_samples=200, max_eval_samples=50)
    assert len(splits["train"]) == 200 and splits["train"]["label"].count(1) == 100
    assert len(splits["test"]) == 50


def test_batches_are_right_padded_with_lengths(shared):
    tok = load_tokenizer(shared / "tokenizer" / "20B_tokenizer.json")
    splits, _ = build_splits("sst2", seed=0, data_dir=shared / "data" / "sst2", max_train_samples=64)
    enc, report = tokenize_splits({"train": splits["train"]}, tok)
    assert report.truncated == {"train": 0}
    rows = [enc["train"][i] for i in range(5)]
    batch = collate(rows)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["lengths"][i] == n
        assert batch["input_ids"][i, :n].tolist() == row["input_ids"]
        assert (batch["input_ids"][i, n:] == PAD_ID).all()
        assert batch["mask"][i].sum() == n and batch["mask"][i, :n].all()
    assert batch["labels"].tolist() == [r["label"] for r in rows]


def test_truncation_only_when_asked_and_counted(shared):
    tok = load_tokenizer(shared / "tokenizer" / "20B_tokenizer.json")
    splits, _ = build_splits("sst2", seed=0, data_dir=shared / "data" / "sst2", max_train_samples=300)
    full, rep = tokenize_splits({"train": splits["train"]}, tok)
    assert rep.truncated == {"train": 0} and max(full["train"]["length"]) == rep.longest["train"] > 8
    cut, rep = tokenize_splits({"train": splits["train"]}, tok, max_length=8)
    assert max(cut["train"]["length"]) == 8
    assert rep.truncated["train"] == sum(n > 8 for n in full["train"]["length"]) > 0


def test_bucket_sampler_covers_everything_and_is_reproducible():
    lengths = [int(x) for x in torch.randint(1, 60, (203,))]
    s = BucketBatchSampler(lengths, 16, shuffle=True, seed=1)
    s.set_epoch(2)
    first = list(s)
    assert sorted(i for b in first for i in b) == list(range(203)) and len(first) == len(s)
    assert list(s) == first
    s.set_epoch(3)
    assert list(s) != first
    assert s.sampler is s  # Lightning calls set_epoch on batch_sampler.sampler
    ev = list(BucketBatchSampler(lengths, 16, shuffle=False))
    assert sorted(i for b in ev for i in b) == list(range(203))


def _labels_of(batches) -> list[list[int]]:
    return [b["input_ids"][:, 0].tolist() for b in batches]  # first token = 10 + example index


@pytest.mark.parametrize("workers", [0, 1])
def test_training_loader_state_continues_where_it_stopped(workers):
    """The state Lightning checkpoints brings a fresh loader to the same place of the same epoch's order."""
    split = toy_split()
    ref = data.make_loader(split, 4, shuffle=True, seed=3, num_workers=workers)
    ref.batch_sampler.set_epoch(1)
    epoch1 = _labels_of(ref)
    ref.batch_sampler.set_epoch(2)
    epoch2 = _labels_of(ref)
    assert len(epoch1) == 13 and epoch1 != epoch2

    run = data.make_loader(split, 4, shuffle=True, seed=3, num_workers=workers)
    run.batch_sampler.set_epoch(1)
    it = iter(run)
    seen = [next(it) for _ in range(5)]
    mid = run.state_dict()
    assert mid == {"epoch": 1, "batches": 5, "length": 13, "seed": 3} and _labels_of(seen) == epoch1[:5]
    rest = _labels_of(it)
    assert rest == epoch1[5:]
    end = run.state_dict()
    assert end["batches"] == 13

    resumed = data.make_loader(split, 4, shuffle=True, seed=3, num_workers=workers)
    resumed.load_state_dict(mid)  # interrupted in the middle: the rest of epoch 1
    resumed.batch_sampler.set_epoch(1)  # Lightning sets the epoch again afterwards: no effect
    assert _labels_of(resumed) == epoch1[5:] and resumed.state_dict()["batches"] == 13
    resumed = data.make_loader(split, 4, shuffle=True, seed=3, num_workers=workers)
    resumed.load_state_dict(end)  # interrupted after the epoch: epoch 2 from its start
    assert _labels_of(resumed) == epoch2

    with pytest.raises(ValueError, match="same data options"):
        data.make_loader(split, 4, shuffle=True, seed=4).load_state_dict(mid)
    with pytest.raises(ValueError, match="same data options"):
        data.make_loader(split, 8, shuffle=True, seed=3).load_state_dict(mid)
    with pytest.raises(ValueError, match="cannot skip 14 batches"):
        run.batch_sampler.skip(14)
    assert not hasattr(data.make_loader(split, 4, shuffle=False), "state_dict")  # evaluation is not resumed


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_empty_and_undecodable_lines_are_skipped_and_counted(tmp_path):
    d = tmp_path / "sst2"
    _write(d / "stsa.binary.train", b"1 good film\n\n0 bad \xff\xfe film\n   \n0 dull\n")
    _write(d / "stsa.binary.dev", b"1 fine\n0\n")
    _write(d / "stsa.binary.test", b"0 meh\n")
    splits, report = read_task("sst2", d)
    assert splits["train"] == (["good film", "dull"], [1, 0])
    assert report.empty["stsa.binary.train"] == 2 and report.undecodable["stsa.binary.train"] == 1
    assert report.empty["stsa.binary.dev"] == 1  # a label without a sentence
    assert report.skipped == 4
    assert "skipped 2 empty and 1 undecodable" in report.summary()


def test_label_out_of_range_names_file_and_line(tmp_path):
    d = tmp_path / "sst2"
    _write(d / "stsa.binary.train", b"1 good\n0 bad\n2 what\n")
    _write(d / "stsa.binary.dev", b"1 fine\n")
    _write(d / "stsa.binary.test", b"0 meh\n")
    with pytest.raises(ValueError, match=r"stsa\.binary\.train, line 3: label 2 is out of range \[0, 2\)"):
        read_task("sst2", d)
    _write(d / "stsa.binary.train", b"x good\n")
    with pytest.raises(ValueError, match=r"line 1: expected 'LABEL sentence'"):
        read_task("sst2", d)


def test_missing_data_dir_names_the_paths_searched(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        find_data_dir("mr", tmp_path / "nowhere")
    monkeypatch.setattr(paths, "search_roots", lambda: [tmp_path / "repo"])
    with pytest.raises(FileNotFoundError) as err:
        find_data_dir("subj")
    msg = str(err.value)
    assert str(tmp_path / "repo" / "data" / "subj") in msg and str(tmp_path / "shared" / "data" / "subj") in msg
    assert "subj.objective" in msg and "--data_dir" in msg


def test_missing_tokenizer_names_the_paths_searched(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "search_roots", lambda: [tmp_path / "repo"])
    with pytest.raises(FileNotFoundError) as err:
        find_tokenizer()
    msg = str(err.value)
    assert str(tmp_path / "repo" / "data" / "20B_tokenizer.json") in msg
    assert str(tmp_path / "shared" / "tokenizer" / "20B_tokenizer.json") in msg and "--tokenizer" in msg


def test_unknown_task_lists_choices():
    with pytest.raises(ValueError, match="subj, mr, sst2, sst5"):
        read_task("imdb")


def test_default_search_finds_shared(shared):
    assert find_data_dir("subj").is_dir()
    assert find_tokenizer().name == "20B_tokenizer.json"
    assert isinstance(ReadReport().skipped, int)
