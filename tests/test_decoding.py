"""The fixed-buffer stepper of decoding.py, on its eager path (the CPU): same as model.step, token for token."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model

from spikegpt_ft import inference
from spikegpt_ft.adapters import SparsityMeter, attach_adapters
from spikegpt_ft.inference import stepping
from spikegpt_ft.inference.decoding import GraphedStepper

B, STEPS, VOCAB = 3, 20, 97


@pytest.fixture(scope="module")
def model():
    """A tiny SpikeGPT with SpikeLoRA adapters whose B matrices are random, so the gates matter."""
    m = attach_adapters(tiny_model(vocab=VOCAB, seed=5), kind="spikelora", r=4)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return m.eval()


def token_rows(n: int = STEPS, batch: int = B, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, batch), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference(model, rows: torch.Tensor, state=None):
    """Logits of every step and the final state, by model.step."""
    state = state if state is not None else model.init_state(rows.shape[1])
    outs = []
    for tokens in rows:
        logits, state = model.step(tokens, state)
        outs.append(logits)
    return torch.stack(outs), state


def assert_same_state(got, expected):
    assert got.signature == expected.signature
    for field in ("att_shift", "ffn_shift", "wkv"):
        torch.testing.assert_close(getattr(got, field), getattr(expected, field), atol=1e-6, rtol=0)
    assert got.membranes.keys() == expected.membranes.keys()
    for name, v in expected.membranes.items():
        torch.testing.assert_close(
            got.membranes[name], torch.zeros_like(got.membranes[name]) if v is None else v, atol=1e-6, rtol=0
        )


def run(stepper, rows: torch.Tensor) -> torch.Tensor:
    return torch.stack([stepper.step(tokens).clone() for tokens in rows])


def test_eager_stepper_equals_model_step_token_by_token(model):
    rows = token_rows()
    expected, final = reference(model, rows)
    stepper = GraphedStepper(model, B)
    assert not stepper.uses_graph  # the CPU: the same in-place function, run eagerly
    got = run(stepper, rows)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert_same_state(stepper.state(), final)
    # the adapters are on this path: without them (same base weights) the logits differ
    base, _ = reference(tiny_model(vocab=VOCAB, seed=5), rows)
    assert (base - expected).abs().max() > 1e-2


def test_logits_are_the_steppers_buffer_and_the_state_is_a_copy(model):
    rows = token_rows(3)
    stepper = GraphedStepper(model, B)
    first = stepper.step(rows[0])
    kept = first.clone()
    second = stepper.step(rows[1])
    assert second.data_ptr() == first.data_ptr()  # documented: a view, overwritten by the next step
    assert not torch.equal(first, kept)
    snapshot = stepper.state()
    stepper.step(rows[2])
    assert not torch.equal(snapshot.att_shift, stepper.state().att_shift)  # the copy did not move along


def test_construction_leaves_sparsity_counts_alone_and_steps_count_like_model_step(model):
    rows = token_rows(5)
    meter = SparsityMeter(model)
    with meter.recording():
        reference(model, rows)
    expected = meter.counts().clone()
    meter.reset()
    with meter.recording():
        stepper = GraphedStepper(model, B)  # its probe step must not be counted
        assert int(meter.counts()[:, 1].sum()) == 0
        run(stepper, rows)
    assert torch.equal(meter.counts(), expected)


def test_load_state_after_prefill_continues_like_model_step(model):
    prompt = token_rows(11, 1, seed=1)[:, 0].tolist()
    rows = token_rows(STEPS, 1, seed=2)
    _, state = inference.prefill(model, prompt, chunk_len=4)
    expected, final = reference(model, rows, state)
    stepper = GraphedStepper(model, 1)
    stepper.load_state(state)
    torch.testing.assert_close(run(stepper, rows), expected, atol=1e-6, rtol=0)
    assert_same_state(stepper.state(), final)
    # and the prompt matters: from a fresh state the continuation differs
    fresh, _ = reference(model, rows)
    assert (fresh - expected).abs().max() > 1e-3


def test_reset_restarts_every_sequence(model):
    rows = token_rows()
    stepper = GraphedStepper(model, B)
    assert_same_state(stepper.state(), model.init_state(B))  # the probe step left nothing behind
    first = run(stepper, rows)
    stepper.reset()
    assert_same_state(stepper.state(), model.init_state(B))
    torch.testing.assert_close(run(stepper, rows), first, atol=0, rtol=0)


def test_a_stepper_run_under_inference_mode_is_reset_and_reloaded_outside_it(model):
    """Steps under ``torch.inference_mode`` leave inference tensors in the state; ``reset`` and ``load_state``
    outside it must still write the state (and the steps after them give model.step's results)."""
    rows = token_rows()
    stepper = GraphedStepper(model, B)
    assert stepper.uses_compiled_step  # whose states are new tensors made by the step
    with torch.inference_mode():
        first = run(stepper, rows)
        after = stepper.state()
    stepper.reset()
    assert_same_state(stepper.state(), model.init_state(B))
    torch.testing.assert_close(run(stepper, rows), first, atol=0, rtol=0)
    stepper.load_state(after)
    expected, final = reference(model, rows, reference(model, rows)[1])
    torch.testing.assert_close(run(stepper, rows), expected, atol=1e-6, rtol=0)
    assert_same_state(stepper.state(), final)


def test_bad_tokens_are_refused_before_anything_runs(model):
    stepper = GraphedStepper(model, B)
    stepper.step(token_rows(1)[0])
    logits_before = stepper.step(token_rows(1, seed=3)[0]).clone()
    before = stepper.state()
    for bad, message in (
        (torch.tensor([1, VOCAB, 2]), f"token id {VOCAB} is outside the vocabulary"),
        (torch.tensor([-1, 0, 2]), "token id -1 is outside the vocabulary"),
        (torch.tensor([1, 2]), r"decodes 3 sequences: tokens must have shape \[3\], got \(2,\)"),
        (torch.tensor([[1, 2, 3]]), r"must have shape \[3\], got \(1, 3\)"),
        (torch.tensor([1.0, 2.0, 3.0]), "token ids must be integers"),
        ([1, 2, 3, 4], r"must have shape \[3\], got \(4,\)"),
    ):
        with pytest.raises(ValueError, match=message):
            stepper.step(bad)
    assert_same_state(stepper.state(), before)
    torch.testing.assert_close(stepper._logits, logits_before, atol=0, rtol=0)
    # a plain list of ints is accepted, as is int32
    stepper.step([1, 2, 3])
    stepper.step(torch.tensor([1, 2, 3], dtype=torch.int32))


def test_bad_construction_and_foreign_states_are_refused(model):
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedStepper(model, B, use_graph=True)
    with pytest.raises(ValueError, match="batch_size"):
        GraphedStepper(model, 0)
    stepper = GraphedStepper(model, B)
    with pytest.raises(ValueError, match="holds 2 sequences but this stepper decodes 3"):
        stepper.load_state(model.init_state(2))
    with pytest.raises(ValueError, match="another model"):
        stepper.load_state(tiny_model(vocab=VOCAB).init_state(B))  # no adapter gates: other neurons
    with pytest.raises(ValueError, match="RecurrentState"):
        stepper.load_state({"att_shift": None})
    model.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            GraphedStepper(model, B)
        with pytest.raises(ValueError, match="training mode"):
            stepper.step(token_rows(1)[0])
    finally:
        model.eval()


def test_generation_and_streaming_through_the_stepper_match_model_step(monkeypatch):
    """generate and stream step through a GraphedStepper (compiled on the CPU): the tokens and running
    predictions of a plain model.step loop written here."""
    from spikegpt_ft.inference.generate import sample_next

    lm = tiny_model(vocab=VOCAB, seed=3)
    clf = tiny_model(vocab=VOCAB, seed=4)
    clf.reset_head(2)
    prompt, text = [5, 9, 42, 7], token_rows(15, 1, seed=6)[:, 0].tolist()

    def plain_generate(temperature: float, generator=None) -> list[int]:
        with torch.no_grad():
            logits, state = lm.prefill(torch.tensor([prompt]), lm.init_state(1))
            logits, out = logits[0, -1], []
            for _ in range(12):
                out.append(sample_next(logits, temperature, 1.0, generator))
                logits, state = lm.step(torch.tensor(out[-1:]), state)
                logits = logits[0]
        return out

    with torch.no_grad():
        state, running = clf.init_state(1), []
        for token in text:
            logits, state = clf.step(torch.tensor([token]), state)
            running.append(torch.softmax(logits[0], dim=-1))
    built = []
    real = stepping.GraphedStepper
    monkeypatch.setattr(stepping, "GraphedStepper", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    assert inference.generate(lm, prompt, 12, temperature=0.0) == plain_generate(0.0)
    sampled = inference.generate(lm, prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert sampled == plain_generate(1.0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.stack(list(inference.stream(clf, text))), torch.stack(running), atol=0, rtol=0)
    assert len(built) == 3 and all(s.uses_compiled_step for s in built)  # one stepper per call, compiled
    assert inference.generate(lm, prompt, 1, temperature=0.0) == plain_generate(0.0)[:1] and len(built) == 3


def test_bench_records_whether_a_graph_was_used_and_refuses_one_on_the_cpu():
    from spikegpt_ft.tools import bench

    tiny = ["--layers", "1", "--embd", "32", "--vocab", "97", "--repeats", "2", "--warmup", "1",
            "--rec-steps", "2", "--rec-batch", "3", "--rec-batch-steps", "2"]  # fmt: skip
    results = bench.main(["recurrent", "--device", "cpu", *tiny])
    assert [(r["cuda_graph"], r["step"]) for r in results] == [(False, "compiled"), (False, "compiled")]
    assert all(r["products_ms"] > 0 and r["torch_products_ms"] > 0 for r in results)  # at 1 and at 3 rows
    results = bench.main(["recurrent", "--device", "cpu", "--eager", *tiny])
    assert [r["step"] for r in results] == ["model.step", "model.step"]
    results = bench.main(["recurrent", "--device", "cpu", "--rec-adapter", "spikelora", "--rank", "4", *tiny])
    assert [(r["adapter"], r["step"]) for r in results] == [("spikelora r4", "compiled")] * 2
    with pytest.raises(SystemExit, match="--cuda-graph needs --device cuda"):
        bench.main(["recurrent", "--device", "cpu", "--cuda-graph", *tiny])
