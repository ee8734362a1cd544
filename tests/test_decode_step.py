"""The compiled CPU step (ops/decode.py, csrc/decode_cpu.cpp) against model.step, its reference: bitwise.

Every precision of inference (float32, bfloat16, int8 weights), batches of 1, 2, 3 and 64 sequences (the
streaming product for few rows, oneDNN's where the CPU takes it for more), an odd width; and the cases in
which the stepper must not take it (adapters, hooks, other neuron settings), where model.step runs instead.
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model

from spikegpt_ft.adapters import attach_adapters
from spikegpt_ft.inference import GraphedStepper, cast_weights
from spikegpt_ft.inference.decoding import compiled_step_operands
from spikegpt_ft.ops import linear as linear_ops
from spikegpt_ft.ops.decode import block_operands, decode_blocks

VOCAB, STEPS = 61, 6


def model_in(precision: str, n_embd: int = 24, n_layer: int = 3, seed: int = 0):
    return cast_weights(tiny_model(vocab=VOCAB, n_embd=n_embd, n_layer=n_layer, seed=seed), precision)


def tokens(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (STEPS, batch), generator=torch.Generator().manual_seed(seed))


def assert_identical_states(got, expected):
    assert got.signature == expected.signature
    for field in ("att_shift", "ffn_shift", "wkv"):
        assert torch.equal(getattr(got, field), getattr(expected, field)), field
    for name, membrane in expected.membranes.items():
        assert torch.equal(got.membranes[name], membrane), name


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("batch", [1, 2, 3, 64])
def test_compiled_step_is_bitwise_model_step(precision, batch):
    model = model_in(precision, n_embd=24 if batch != 3 else 13)  # 13: no multiple of any vector width
    rows = tokens(batch, seed=batch)
    with torch.no_grad():
        stepper = GraphedStepper(model, batch)
        assert stepper.uses_compiled_step
        state = model.init_state(batch)
        fired = 0
        for row in rows:
            expected, state = model.step(row, state)
            got = stepper.step(row)
            assert got.dtype == expected.dtype
            assert torch.equal(got, expected)
            fired += sum(int(v.eq(0).sum()) for v in state.membranes.values())  # reset after a spike
        assert_identical_states(stepper.state(), state)
    assert fired > 0  # the neurons spiked: the LIF path was exercised, not only the linear layers


@pytest.mark.parametrize("matrix_units", [True, False])
def test_both_products_of_many_bfloat16_rows_are_those_of_the_modules(matrix_units, monkeypatch):
    """64 rows: oneDNN's product where the CPU has bfloat16 matrix units, the streaming kernel where not."""
    monkeypatch.setattr(linear_ops, "has_bf16_matrix_units", lambda: matrix_units)
    model = model_in("bfloat16")
    operands = compiled_step_operands(model, 64)
    assert all(o.stream == (not matrix_units,) * 7 for o in operands)
    with torch.no_grad():
        stepper, state = GraphedStepper(model, 64), model.init_state(64)
        for row in tokens(64, seed=9):
            expected, state = model.step(row, state)
            assert torch.equal(stepper.step(row), expected)


def test_neurons_at_rest_start_from_v_reset():
    model = model_in("float32")
    fresh = model.init_state(2)
    assert set(fresh.membranes.values()) == {None}
    ids = torch.tensor([8, 9])
    with torch.no_grad():
        operands = [block_operands(b, torch.float32, 2) for b in model.blocks]
        x = model.binarize(model.emb(ids))
        out = decode_blocks(x, operands, fresh.att_shift, fresh.ffn_shift, fresh.wkv, list(fresh.membranes.values()))
        expected, expected_state = model.step(ids, fresh)
    assert torch.equal(model.head(model.ln_out(out[0])), expected)
    assert all(torch.equal(a, b) for a, b in zip(out[4], expected_state.membranes.values(), strict=True))


def test_the_inputs_of_decode_blocks_are_left_as_they_were():
    model = model_in("float32")
    with torch.no_grad():
        _, state = model.step(torch.tensor([4, 5]), model.init_state(2))
        before = {k: v.clone() for k, v in state.membranes.items()}
        shifts = state.att_shift.clone(), state.ffn_shift.clone(), state.wkv.clone()
        operands = [block_operands(b, torch.float32, 2) for b in model.blocks]
        x = model.binarize(model.emb(torch.tensor([6, 7])))
        out = decode_blocks(x, operands, state.att_shift, state.ffn_shift, state.wkv, list(state.membranes.values()))
    assert len(out[4]) == 2 * len(model.blocks)
    expected, expected_state = model.step(torch.tensor([6, 7]), state)
    assert torch.equal(model.head(model.ln_out(out[0])), expected)
    assert all(torch.equal(a, b) for a, b in zip(out[4], expected_state.membranes.values(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(shifts, (state.att_shift, state.ffn_shift, state.wkv), strict=True))
    assert all(torch.equal(state.membranes[k], v) for k, v in before.items())


@pytest.mark.parametrize("kind", ["lora", "spikelora"])
def test_adapters_take_model_step_and_give_its_results(kind):
    model = attach_adapters(tiny_model(vocab=VOCAB, n_embd=24, seed=1), kind=kind, r=4).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        stepper = GraphedStepper(model, 2)
        assert not stepper.uses_compiled_step
        state = model.init_state(2)
        for row in tokens(2):
            expected, state = model.step(row, state)
            assert torch.equal(stepper.step(row), expected)


def test_a_hook_added_after_construction_is_called_and_the_results_stay_the_same():
    model = model_in("bfloat16")
    rows = tokens(1, seed=3)
    calls = []
    with torch.no_grad():
        stepper = GraphedStepper(model, 1)
        assert stepper.uses_compiled_step
        state = model.init_state(1)
        handle = model.blocks[1].lif2.register_forward_hook(lambda m, i, o: calls.append(o.sum()))
        try:
            for row in rows:
                expected, state = model.step(row, state)
                assert torch.equal(stepper.step(row), expected)
        finally:
            handle.remove()
        assert len(calls) == 2 * STEPS  # model.step's calls and the stepper's
        calls.clear()
        stepper.step(rows[0])
    assert calls == []  # removed: the compiled step again


def test_blocks_outside_the_kernel_settings_are_not_compiled():
    model = model_in("float32")
    assert compiled_step_operands(model, 1) is not None
    model.blocks[1].lif1.detach_reset = True  # a setting the LIF kernel does not implement
    assert block_operands(model.blocks[1], torch.float32, 1) is None
    assert compiled_step_operands(model, 1) is None
    model.blocks[1].lif1.detach_reset = False
    model.blocks[0].ln1.eps = 1e-6  # LayerNorms of different eps
    assert compiled_step_operands(model, 1) is None
    model.blocks[0].ln1.eps = model.blocks[0].ln2.eps
    model.half()  # a dtype the step does not take
    assert compiled_step_operands(model, 1) is None


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_recurrent_classification_runs_compiled_with_model_steps_results(precision, monkeypatch):
    """class_logits steps a shrinking batch: the compiled steps give what model.step gives on the same batch."""
    import importlib

    from spikegpt_ft.inference import class_logits

    classify = importlib.import_module("spikegpt_ft.inference.classify")
    model = model_in(precision, seed=2)
    model.reset_head(3)  # in the model's dtype
    texts = [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 4, 7, 1)]
    calls = []
    real = classify.compiled_step
    monkeypatch.setattr(classify, "compiled_step", lambda *a: calls.append(a[2].shape[0]) or real(*a))
    compiled = class_logits(model, texts, "recurrent")
    assert sorted(set(calls)) == [1, 2, 3, 4]  # texts of 9, 7, 4 and 1 tokens leave the batch one by one
    monkeypatch.setattr(classify, "compiled_step_operands", lambda *a: None)
    assert torch.equal(compiled, class_logits(model, texts, "recurrent"))
