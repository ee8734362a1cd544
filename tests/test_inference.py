"""Recurrent-mode inference: classification, streaming, long inputs, generation, sampling, and the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import SHARED, export_classifier_run, tiny_model

from spikegpt_ft import inference
from spikegpt_ft.cli import infer as infer_cli
from spikegpt_ft.data import EOS_ID
from spikegpt_ft.inference import cast_weights

TOKENIZER = SHARED / "tokenizer" / "20B_tokenizer.json"
TEXTS = [
    "a gripping, beautifully acted film .",
    "the plot follows two brothers who leave their village in search of work",
    "dull",
    "it is neither as funny nor as moving as it wants to be , but the cast is game and the score is lovely .",
    "an overlong mess",
]


def classifier(vocab: int = 97, seed: int = 0):
    model = tiny_model(vocab=vocab, seed=seed)
    model.reset_head(2)
    return model


def reference_last_logits(model, ids_list):
    """Parallel logits at the last token, each text alone (no batching, no padding, no chunks)."""
    with torch.no_grad():
        return torch.stack([model(torch.tensor([ids]))[0, -1] for ids in ids_list])


@pytest.fixture(scope="module")
def tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    if not TOKENIZER.is_file():
        pytest.fail(f"the shared tokenizer is expected at {TOKENIZER}")
    return tokenizers.Tokenizer.from_file(str(TOKENIZER))


@pytest.fixture(scope="module")
def text_model_and_ids(tokenizer):
    model = classifier(vocab=50277)
    return model, [tokenizer.encode(t).ids for t in TEXTS]


def test_recurrent_equals_parallel_on_texts_of_different_lengths(text_model_and_ids):
    model, ids_list = text_model_and_ids
    assert len({len(i) for i in ids_list}) == len(ids_list), "the texts should differ in length"
    ref = torch.softmax(reference_last_logits(model, ids_list), -1)
    for batch_size in (2, 64):  # several length groups, and one padded batch
        rec = inference.classify(model, ids_list, "recurrent", batch_size=batch_size)
        par = inference.classify(model, ids_list, "parallel", batch_size=batch_size)
        assert rec.shape == (len(TEXTS), 2)
        torch.testing.assert_close(rec, par, atol=1e-4, rtol=0)
        torch.testing.assert_close(rec, ref, atol=1e-4, rtol=0)
        assert rec.argmax(-1).tolist() == par.argmax(-1).tolist() == ref.argmax(-1).tolist()


@pytest.mark.parametrize("kind", ["lora", "spikelora"])
def test_recurrent_equals_parallel_with_adapters(kind):
    from spikegpt_ft.adapters import attach_adapters

    model = attach_adapters(classifier(), kind=kind, r=4)
    with torch.no_grad():  # adapters start at zero: give them weights that change the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids_list = [list(range(3, 3 + n)) for n in (9, 30, 1, 17)]
    ref = torch.softmax(reference_last_logits(model, ids_list), -1)
    rec = inference.classify(model, ids_list, "recurrent", batch_size=3)
    par = inference.classify(model, ids_list, "parallel", batch_size=3, chunk_len=8)
    torch.testing.assert_close(rec, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(par, ref, atol=1e-4, rtol=0)


def test_padding_never_changes_a_prediction():
    model = classifier()
    short = [5, 17, 3]
    long = list(range(1, 60))
    alone = inference.class_logits(model, [short])
    for mode in inference.MODES:
        together = inference.class_logits(model, [long, short, long[:20]], mode)
        torch.testing.assert_close(together[1], alone[0], atol=1e-5, rtol=0)


def test_streaming_gives_one_prediction_per_token_and_ends_on_the_final_one(text_model_and_ids):
    model, ids_list = text_model_and_ids
    ids = ids_list[3]
    running = list(inference.stream(model, ids))
    assert len(running) == len(ids)
    assert all(p.shape == (2,) and abs(float(p.sum()) - 1) < 1e-5 for p in running)
    final = inference.classify(model, [ids])[0]
    torch.testing.assert_close(running[-1], final, atol=1e-6, rtol=0)
    # every running prediction is the parallel prediction of the prefix read so far
    with torch.no_grad():
        prefix = torch.softmax(model(torch.tensor([ids]))[0], -1)
    torch.testing.assert_close(torch.stack(running), prefix, atol=1e-4, rtol=0)


def test_long_input_is_carried_across_chunks_not_truncated():
    model = classifier()
    g = torch.Generator().manual_seed(1)
    long = torch.randint(0, 97, (300,), generator=g).tolist()
    short = long[:7]
    ref = torch.softmax(reference_last_logits(model, [long, short]), -1)
    par = inference.classify(model, [long, short], "parallel", chunk_len=64)  # 300 tokens = 5 chunks
    rec = inference.classify(model, [long, short], "recurrent")
    torch.testing.assert_close(par, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(rec, ref, atol=1e-4, rtol=0)
    # and the tail matters: a different first token changes the state that reaches the end
    logits, _ = inference.prefill(model, long, chunk_len=64)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(torch.tensor([long]))[0, -1], atol=1e-4, rtol=0)


def test_evaluate_reports_accuracy_and_modes_agree():
    model = classifier()
    g = torch.Generator().manual_seed(2)
    ids_list = [torch.randint(0, 97, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (30,), generator=g)]
    ref = reference_last_logits(model, ids_list).argmax(-1).tolist()
    labels = [1 - y if i % 3 == 0 else y for i, y in enumerate(ref)]  # a third wrong on purpose
    expected = sum(int(a == b) for a, b in zip(ref, labels, strict=True)) / len(labels)
    rec = inference.evaluate(model, ids_list, labels, "recurrent", batch_size=8)
    par = inference.evaluate(model, ids_list, labels, "parallel", batch_size=8)
    assert rec.accuracy == pytest.approx(expected) and par.accuracy == pytest.approx(expected)
    assert inference.agreement(rec, par) == 1.0
    with pytest.raises(ValueError, match="labels"):
        inference.evaluate(model, ids_list, labels[:-1])


def test_empty_text_and_bad_mode_are_refused():
    model = classifier()
    with pytest.raises(ValueError, match="no tokens"):
        inference.classify(model, [[1, 2], []])
    with pytest.raises(ValueError, match="mode"):
        inference.classify(model, [[1, 2]], mode="spiking")


def test_greedy_generation_equals_argmax_of_the_parallel_model():
    model = tiny_model(vocab=97, seed=3)
    prompt = [5, 9, 42, 7]
    got = inference.generate(model, prompt, 12, temperature=0.0)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(prompt) :]
    # a prompt longer than the chunk gives the same continuation
    assert inference.generate(model, prompt, 12, temperature=0.0, chunk_len=3) == got


def test_generation_stops_after_a_stop_token_and_is_reproducible_with_a_seed():
    model = tiny_model(vocab=97, seed=3)
    greedy = inference.generate(model, [5, 9], 10, temperature=0.0)
    stop = greedy[3]
    cut = inference.generate(model, [5, 9], 10, temperature=0.0, stop_ids=(stop,))
    assert cut == greedy[: greedy.index(stop) + 1]
    runs = [
        inference.generate(model, [5, 9], 15, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert runs[0] == runs[1] and len(runs[0]) == 15


def test_top_p_never_samples_outside_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.02, 0.3, 0.13])  # sorted: 0.5, 0.3, 0.13, 0.05, 0.02
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    for top_p, nucleus in ((0.4, {1}), (0.7, {1, 3}), (0.9, {1, 3, 4}), (0.97, {0, 1, 3, 4})):
        kept = inference.nucleus(probs, top_p)
        assert {int(i) for i in kept.nonzero()} == nucleus
        torch.testing.assert_close(kept.sum(), torch.tensor(1.0))
        seen = {inference.sample_next(logits, 1.0, top_p, g) for _ in range(400)}
        assert seen <= nucleus
        assert seen == nucleus  # every token of the nucleus does get drawn (400 draws)
    assert inference.sample_next(logits, 0.0, 0.1) == 1
    with pytest.raises(ValueError, match="top_p"):
        inference.nucleus(probs, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        inference.sample_next(logits, -1.0)


# ---- the CLI ----------------------------------------------------------------------------------


def run_cli(argv, capsys):
    try:
        code = infer_cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--checkpoint", "/nonexistent/run", "--text", "hi"], "no checkpoint at /nonexistent/run"),
        (["--generate", "Once upon a time"], "--generate needs a language model"),
        (["--base", "/nonexistent/base.pth", "--generate", "hi"], "base model not found"),
        ([], "give --checkpoint"),
    ],
)
def test_cli_bad_input_exits_nonzero_with_a_clear_message(argv, message, capsys):
    code, out, err = run_cli(argv, capsys)
    assert code != 0
    assert message in err and "Traceback" not in err


def test_cli_wrong_kind_of_file(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    code, _, err = run_cli(["--base", str(text), "--generate", "hi", "--tokenizer", str(TOKENIZER)], capsys)
    assert code == 2 and "error:" in err and "not a readable PyTorch checkpoint" in err


def test_cli_checkpoint_of_the_wrong_kind(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    code, _, err = run_cli(["--checkpoint", str(text), "--text", "hi"], capsys)
    assert code == 2 and "error:" in err and str(text) in err and "Traceback" not in err


@pytest.fixture
def fake_checkpoint(tmp_path, text_model_and_ids):
    """A finished run directory holding the tiny text classifier."""
    model, _ = text_model_and_ids
    return export_classifier_run(copy.deepcopy(model), tmp_path / "run"), model


def test_cli_classifies_file_lines_skipping_empty_and_undecodable(fake_checkpoint, tokenizer, tmp_path, capsys):
    run, model = fake_checkpoint
    texts = tmp_path / "texts.txt"
    texts.write_bytes(b"\n".join([TEXTS[0].encode(), b"", b"caf\xe9 latin-1", b"   ", TEXTS[2].encode()]) + b"\n")
    expected = inference.classify(model, [tokenizer.encode(TEXTS[0]).ids, tokenizer.encode(TEXTS[2]).ids])
    for mode in inference.MODES:
        code, out, err = run_cli(["--checkpoint", str(run), "--file", str(texts), "--json", "--mode", mode], capsys)
        assert code == 0
        rows = [json.loads(line) for line in out.splitlines()]
        assert [r["line"] for r in rows] == [1, 5]
        assert all(r["mode"] == mode and set(r["probs"]) == {"objective", "subjective"} for r in rows)
        for row, probs in zip(rows, expected, strict=True):
            assert row["label"] == ["objective", "subjective"][int(probs.argmax())]
            assert row["probs"]["subjective"] == pytest.approx(float(probs[1]), abs=1e-4)
        assert "skipped 3 input line(s): 2 empty, 1 undecodable" in err


def test_cli_stream_prints_one_prediction_per_token(fake_checkpoint, tokenizer, capsys):
    run, model = fake_checkpoint
    code, out, _ = run_cli(["--checkpoint", str(run), "--text", TEXTS[0], "--stream", "--json"], capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    ids = tokenizer.encode(TEXTS[0]).ids
    assert len(rows) == len(ids) and [r["token_index"] for r in rows] == list(range(len(ids)))
    final = inference.classify(model, [ids])[0]
    assert rows[-1]["probs"]["subjective"] == pytest.approx(float(final[1]), abs=1e-5)


def test_cli_classifies_with_int8_weights_as_the_quantized_model_does(fake_checkpoint, tokenizer, capsys):
    run, model = fake_checkpoint
    quantized = cast_weights(copy.deepcopy(model), "int8")
    ids = [tokenizer.encode(t).ids for t in TEXTS[:2]]
    for mode in inference.MODES:
        expected = inference.classify(quantized, ids, mode)
        argv = ["--checkpoint", str(run), "--json", "--mode", mode, "--weights", "int8"]
        code, out, err = run_cli([*argv, "--text", TEXTS[0], "--text", TEXTS[1]], capsys)
        assert code == 0, err
        rows = [json.loads(line) for line in out.splitlines()]
        for row, probs in zip(rows, expected, strict=True):
            assert row["probs"]["subjective"] == pytest.approx(float(probs[1]), abs=1e-6)


def test_cli_greedy_generation_matches_the_engine(tmp_path, tokenizer, capsys):
    model = tiny_model(vocab=50277, seed=4)
    base = tmp_path / "base.pth"
    torch.save(model.state_dict(), base)
    prompt = "The film"
    code, out, err = run_cli(
        [
            "--base",
            str(base),
            "--generate",
            prompt,
            "--max-tokens",
            "6",
            "--temperature",
            "0",
            "--tokenizer",
            str(TOKENIZER),
        ],
        capsys,
    )
    assert code == 0, err
    tokens = inference.generate(model, tokenizer.encode(prompt).ids, 6, temperature=0.0, stop_ids=(EOS_ID,))
    tokens = [t for t in tokens if t != EOS_ID]
    assert out == prompt + tokenizer.decode(tokens) + "\n"


def test_cli_evaluate_reports_both_modes_on_the_test_split(fake_checkpoint, tokenizer, tmp_path, capsys):
    from spikegpt_ft.data import build_splits

    _, model = fake_checkpoint
    data = tmp_path / "subj"
    data.mkdir()
    words = ["plot", "film", "brilliant", "dull", "the", "a", "story", "of", "two", "lovely", "mess", "village"]
    g = torch.Generator().manual_seed(5)
    for name in ("subj.objective", "subj.subjective"):
        lines = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (int(n),), generator=g))
                 for n in torch.randint(1, 30, (40,), generator=g)]  # fmt: skip
        (data / name).write_text("\n".join(lines) + "\n", encoding="latin-1")
    run = export_classifier_run(copy.deepcopy(model), tmp_path / "evaluated", data_dir=data)
    code, out, err = run_cli(["--checkpoint", str(run), "--evaluate", "--data-dir", str(data), "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    test = build_splits("subj", 0, data)[0]["test"]
    ids_list = [tokenizer.encode(t).ids for t in test["text"]]
    predicted = reference_last_logits(model, ids_list).argmax(-1).tolist()
    expected = sum(int(p == y) for p, y in zip(predicted, test["label"], strict=True)) / len(ids_list)
    assert result["n"] == len(ids_list) == 8
    assert result["recurrent_accuracy"] == pytest.approx(expected)
    assert result["parallel_accuracy"] == pytest.approx(expected)
    assert result["agreement"] == 1.0
    assert result["weights"] == "float32"
