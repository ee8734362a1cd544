"""The compiled CPU step (ops/decode.py, csrc/decode_cpu.cpp) against model.step, its reference: bitwise.

Every precision of inference (float32, bfloat16, int8 weights), batches of 1, 2, 3 and 64 sequences (the
streaming product for few rows, the AMX kernel or oneDNN's where the CPU takes them for more), an odd width;
and the cases in which the stepper must not take it (adapters, hooks, other neuron settings), where model.step
runs instead.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import tiny_model

from spikegpt_ft.adapters import SparsityMeter, attach_adapters, merge_adapters
from spikegpt_ft.inference import GraphedStepper, cast_weights
from spikegpt_ft.inference.decoding import compile_step
from spikegpt_ft.ops import linear as linear_ops
from spikegpt_ft.ops.decode import KERNELS, PRODUCTS, block_operands, decode_blocks, stack_operands

VOCAB, STEPS = 61, 6


def model_in(precision: str, n_embd: int = 24, n_layer: int = 3, seed: int = 0):
    return cast_weights(tiny_model(vocab=VOCAB, n_embd=n_embd, n_layer=n_layer, seed=seed), precision)


def tokens(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (STEPS, batch), generator=torch.Generator().manual_seed(seed))


def slots(model, state) -> list:
    """The membranes in decode_blocks' layout for a model without adapters: seven empty gate slots, lif1, lif2."""
    return [
        x
        for i in range(len(model.blocks))
        for x in [None] * 7 + [state.membranes[f"blocks.{i}.lif{j}"] for j in (1, 2)]
    ]


def carried(membranes: list) -> list:
    return [m for m in membranes if m is not None]


def assert_identical_states(got, expected):
    assert got.signature == expected.signature
    for field in ("att_shift", "ffn_shift", "wkv"):
        assert torch.equal(getattr(got, field), getattr(expected, field)), field
    for name, membrane in expected.membranes.items():
        assert torch.equal(got.membranes[name], membrane), name


def assert_compiled_steps_are_model_steps(model, batch: int) -> None:
    """STEPS tokens through the stepper (compiled) and through model.step: the same logits and states, bitwise."""
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


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("batch", [1, 2, 3, 64])
def test_compiled_step_is_bitwise_model_step(precision, batch):
    assert_compiled_steps_are_model_steps(model_in(precision, n_embd=24 if batch != 3 else 13), batch)  # 13: odd


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_the_elementwise_passes_split_over_threads_give_model_steps_results(precision):
    """63 sequences of width 521: each elementwise pass of the step (63 x 521 or 63 x 2084 values) is more than
    one thread's share (kMinElementsPerThread in decode_cpu.cpp), so two threads split it, at an element that is
    no multiple of a vector's width."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert_compiled_steps_are_model_steps(model_in(precision, n_embd=521, n_layer=2), 63)
    finally:
        torch.set_num_threads(threads)


#: The product of many bfloat16 rows: (bfloat16 matrix units, AMX usable) -> the compiled step's kernel.
MANY_ROW_KERNELS = {(True, True): "amx", (True, False): "aten", (False, False): "stream"}


@pytest.mark.parametrize(("matrix_units", "amx"), list(MANY_ROW_KERNELS))
def test_every_product_of_many_bfloat16_rows_is_that_of_the_modules(matrix_units, amx, monkeypatch):
    """64 rows: the AMX kernel where the CPU has AMX, oneDNN's product where it has other bfloat16 matrix
    units, the streaming kernel where none."""
    if amx and not linear_ops.amx_usable():
        pytest.skip("this CPU cannot run the AMX kernel (no AMX-BF16)")
    monkeypatch.setattr(linear_ops, "has_bf16_matrix_units", lambda: matrix_units)
    monkeypatch.setattr(linear_ops, "amx_usable", lambda: amx)
    model = model_in("bfloat16")
    plan = compile_step(model, 64)
    assert all(p.kernel == MANY_ROW_KERNELS[matrix_units, amx] for o in plan.blocks for p in o.products)
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
        out = decode_blocks(
            x, stack_operands(operands), fresh.att_shift, fresh.ffn_shift, fresh.wkv, slots(model, fresh)
        )
        expected, expected_state = model.step(ids, fresh)
    assert torch.equal(model.head(model.ln_out(out[0])), expected)
    assert all(torch.equal(a, b) for a, b in zip(carried(out[4]), expected_state.membranes.values(), strict=True))


def one_step_in(precision: str):
    """A model of ``precision``, its state after one token of two sequences, its stack's operands and the
    embedding of the next two tokens: the inputs of a direct :func:`decode_blocks` call."""
    model = model_in(precision)
    dtype = model.emb.weight.dtype
    _, state = model.step(torch.tensor([4, 5]), model.init_state(2))
    stack = stack_operands([block_operands(b, dtype, 2) for b in model.blocks])
    return model, state, stack, model.binarize(model.emb(torch.tensor([6, 7])))


def test_the_inputs_of_decode_blocks_are_left_as_they_were():
    with torch.no_grad():
        model, state, stack, x = one_step_in("float32")
        before = {k: v.clone() for k, v in state.membranes.items()}
        shifts = state.att_shift.clone(), state.ffn_shift.clone(), state.wkv.clone()
        out = decode_blocks(x, stack, state.att_shift, state.ffn_shift, state.wkv, slots(model, state))
    assert len(out[4]) == 9 * len(model.blocks) and len(carried(out[4])) == 2 * len(model.blocks) and out[5] == []
    expected, expected_state = model.step(torch.tensor([6, 7]), state)
    assert torch.equal(model.head(model.ln_out(out[0])), expected)
    assert all(torch.equal(a, b) for a, b in zip(carried(out[4]), expected_state.membranes.values(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(shifts, (state.att_shift, state.ffn_shift, state.wkv), strict=True))
    assert all(torch.equal(state.membranes[k], v) for k, v in before.items())


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_decode_blocks_takes_shifts_of_any_float32_values_as_model_step_does(precision):
    """Shifts that are no bfloat16 values (decoding itself only writes the step's own values there): the kernel
    rounds them to the step's dtype where the modules do, so the token after them is model.step's."""
    with torch.no_grad():
        model, state, stack, x = one_step_in(precision)
        g = torch.Generator().manual_seed(3)
        for shift in (state.att_shift, state.ffn_shift):
            shift.copy_(torch.randn(shift.shape, generator=g))
        assert not torch.equal(state.att_shift, state.att_shift.bfloat16().float())
        out = decode_blocks(x, stack, state.att_shift, state.ffn_shift, state.wkv, slots(model, state))
        expected, expected_state = model.step(torch.tensor([6, 7]), state)
    assert torch.equal(model.head(model.ln_out(out[0])), expected)
    assert torch.equal(out[1], expected_state.att_shift) and torch.equal(out[2], expected_state.ffn_shift)
    assert torch.equal(out[3], expected_state.wkv)  # continuous in the mixes, where spikes would hide a difference


def test_decode_blocks_writes_the_next_state_into_given_tensors_and_refuses_overlapping_ones():
    with torch.no_grad():
        model, state, stack, x = one_step_in("float32")
        inputs = (x, stack, state.att_shift, state.ffn_shift, state.wkv, slots(model, state))
        fresh = decode_blocks(*inputs)
        into = tuple(torch.full_like(t, float("nan")) for t in (state.att_shift, state.ffn_shift, state.wkv))
        out = decode_blocks(*inputs, into=into)
        assert all(got is given for got, given in zip(out[1:4], into, strict=True))  # written into, returned
        assert all(torch.equal(a, b) for a, b in zip(out[1:4], fresh[1:4], strict=True)) and torch.equal(
            out[0], fresh[0]
        )
        with pytest.raises(RuntimeError, match="overlap"):
            decode_blocks(*inputs, into=(state.att_shift, into[1], into[2]))  # the state it reads
        with pytest.raises(RuntimeError, match="overlap"):
            decode_blocks(*inputs, into=(into[0], into[0], into[2]))  # ffn_shift's into[0] aliases att_shift's
        with pytest.raises(RuntimeError, match=r"into\[2\] must be a contiguous CPU tensor like"):
            decode_blocks(*inputs, into=(into[0], into[1], into[2][:, :1]))


def test_decode_blocks_reads_a_strided_state_as_its_values_and_refuses_one_not_in_float32():
    """The kernel reads the state through raw pointers: a state laid out otherwise must give the same result."""
    with torch.no_grad():
        model, state, stack, x = one_step_in("bfloat16")

        def strided(t: torch.Tensor) -> torch.Tensor:  # the same values, the last two dimensions swapped in memory
            return torch.empty(t.shape[0], *t.shape[:0:-1], dtype=t.dtype).transpose(1, -1).copy_(t)

        shifts = (state.att_shift, state.ffn_shift, state.wkv)
        plain = decode_blocks(x, stack, *shifts, slots(model, state))
        other = decode_blocks(x, stack, *(strided(t) for t in shifts), slots(model, state))
        assert not strided(state.wkv).is_contiguous()
        assert all(torch.equal(a, b) for a, b in zip(plain[:4], other[:4], strict=True))
        assert all(torch.equal(a, b) for a, b in zip(carried(plain[4]), carried(other[4]), strict=True))
        with pytest.raises(RuntimeError, match="the state must be float32 CPU tensors"):
            decode_blocks(x, stack, state.att_shift.bfloat16(), state.ffn_shift, state.wkv, slots(model, state))


def adapted(kind: str, gate: str = "temporal", precision: str = "float32", seed: int = 1):
    """A model with adapters on every linear layer of its blocks, their B random so that the updates matter, and a
    scaling (0.3) that is no power of two, so that multiplying by it rounds."""
    model = attach_adapters(tiny_model(vocab=VOCAB, n_embd=24, seed=seed), kind=kind, r=4, alpha=1.2, gate=gate).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return cast_weights(model, precision)


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize(
    ("kind", "gate"), [("lora", "temporal"), ("spikelora", "temporal"), ("spikelora", "pointwise")]
)
def test_adapters_run_compiled_with_model_steps_results_and_sparsity(kind, gate, precision):
    model = adapted(kind, gate, precision)
    # bfloat16 activations (bf16 and int8 models): A and B streamed, as AdapterLinear.forward multiplies 3 rows
    lora_kernel = "stream" if model.emb.weight.dtype == torch.bfloat16 else "aten"
    assert compile_step(model, 3).stack.lora_kernels == [KERNELS[lora_kernel]] * (len(model.blocks) * len(PRODUCTS))
    rows = tokens(3, seed=4)
    meter = SparsityMeter(model)
    with torch.no_grad():
        state = model.init_state(3)
        expected = []
        with meter.recording():
            for row in rows:
                logits, state = model.step(row, state)
                expected.append(logits)
        expected_counts = meter.counts().clone()
        meter.reset()
        stepper = GraphedStepper(model, 3)
        assert stepper.uses_compiled_step
        with meter.recording():
            for row, logits in zip(rows, expected, strict=True):
                assert torch.equal(stepper.step(row), logits)
        assert_identical_states(stepper.state(), state)
    assert torch.equal(meter.counts(), expected_counts)
    if kind == "spikelora":
        zeros, total = expected_counts.sum(0).tolist()
        assert 0 < zeros < total  # the gates both passed and blocked: the gating was exercised


def test_merged_lora_runs_compiled_and_adapters_in_training_mode_do_not():
    model = adapted("lora")
    merge_adapters(model)
    assert compile_step(model, 1) is not None
    with torch.no_grad():
        stepper, state = GraphedStepper(model, 1), model.init_state(1)
        for row in tokens(1):
            expected, state = model.step(row, state)
            assert torch.equal(stepper.step(row), expected)
    model.blocks[0].att.key.train()  # its dropout would act: the modules must run
    assert compile_step(model, 1) is None


def test_merging_after_construction_is_seen_by_the_stepper():
    model = adapted("lora", seed=6)
    with torch.no_grad():
        stepper, state = GraphedStepper(model, 2), model.init_state(2)
        rows = tokens(2, seed=7)
        merge_adapters(model)  # in place: the base weights now hold the updates, the adapters skip them
        for row in rows:
            expected, state = model.step(row, state)
            assert torch.equal(stepper.step(row), expected)
        assert stepper.uses_compiled_step


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
    assert compile_step(model, 1) is not None
    model.blocks[1].lif1.detach_reset = True  # a setting the LIF kernel does not implement
    assert block_operands(model.blocks[1], torch.float32, 1) is None
    assert compile_step(model, 1) is None
    model.blocks[1].lif1.detach_reset = False
    model.blocks[0].ln1.eps = 1e-6  # LayerNorms of different eps
    assert compile_step(model, 1) is None
    model.blocks[0].ln1.eps = model.blocks[0].ln2.eps
    model.half()  # a dtype the step does not take
    assert compile_step(model, 1) is None


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
    real = classify.step_function

    def counted(model, batch_size):
        step = real(model, batch_size)
        assert step != model.step  # compiled
        return lambda tokens, state: calls.append(tokens.shape[0]) or step(tokens, state)

    monkeypatch.setattr(classify, "step_function", counted)
    compiled = class_logits(model, texts, "recurrent")
    assert sorted(set(calls)) == [1, 2, 3, 4]  # texts of 9, 7, 4 and 1 tokens leave the batch one by one
    monkeypatch.setattr(classify, "step_function", lambda model, batch_size: model.step)
    assert torch.equal(compiled, class_logits(model, texts, "recurrent"))


@pytest.mark.skipif(not linear_ops.amx_usable(), reason="this CPU cannot run the AMX kernel (no AMX-BF16)")
@pytest.mark.parametrize("inference_tensors", [False, True])
@pytest.mark.filterwarnings("ignore:a bfloat16 weight made under torch.inference_mode")  # checked once, below
def test_the_compiled_step_sees_a_weight_changed_in_place_through_its_amx_layout(inference_tensors):
    """The stepper's products read the AMX layout of each weight: a weight changed after the stepper was made
    (between its steps, before anything else multiplies with it) is seen at the next step."""
    model = model_in("bfloat16")
    with torch.inference_mode() if inference_tensors else torch.no_grad():
        if inference_tensors:  # weights without a version counter to tell a change by
            for module in model.modules():
                for name, p in list(module.named_parameters(recurse=False)):
                    setattr(module, name, torch.nn.Parameter(p.clone(), requires_grad=False))
            assert model.blocks[1].ffn.key.weight.is_inference()
        weights = model.blocks[1].ffn.key.weight, model.blocks[2].att.output.weight
        after = [-1.5 * weights[0], torch.randn(weights[1].shape, generator=torch.Generator().manual_seed(3))]
        told = pytest.warns(UserWarning, match="made under torch.inference_mode")  # a layout at every product
        with told if inference_tensors else contextlib.nullcontext():
            stepper = GraphedStepper(model, 64)
        assert stepper.uses_compiled_step
        rows = tokens(64, seed=10)
        got = [stepper.step(rows[0]).clone()]  # the stepper returns its own buffer, overwritten at each step
        for w, new in zip(weights, after, strict=True):
            w.copy_(new)
        got += [stepper.step(row).clone() for row in rows[1:]]
    # the reference: model.step of fresh models (no layout made before) with the weights of each token
    with torch.no_grad():
        expected, state = model_in("bfloat16").step(rows[0], model_in("bfloat16").init_state(64))
        assert torch.equal(got[0], expected)
        changed = model_in("bfloat16")
        for w, new in zip((changed.blocks[1].ffn.key.weight, changed.blocks[2].att.output.weight), after, strict=True):
            w.copy_(new)
        for row, out in zip(rows[1:], got[1:], strict=True):
            expected, state = changed.step(row, state)
            assert torch.equal(out, expected)


def test_a_bfloat16_model_loaded_from_a_checkpoint_steps_compiled_with_the_streaming_product(tmp_path):
    from spikegpt_ft.model import load_model, save_official

    path = save_official(tiny_model(vocab=VOCAB, n_embd=24).state_dict(), tmp_path / "model.pth")
    model = load_model(path, dtype=torch.bfloat16)
    plan = compile_step(model, 1)
    assert plan is not None and all(p.kernel == "stream" for b in plan.blocks for p in b.products)
    with torch.no_grad():
        stepper, state = GraphedStepper(model, 1), model.init_state(1)
        for row in tokens(1, seed=8):
            expected, state = model.step(row, state)
            assert torch.equal(stepper.step(row), expected)
