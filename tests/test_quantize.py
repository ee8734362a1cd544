"""Lower-precision inference weights (spikegpt_ft.inference.precision, spikegpt_ft.ops.linear): int8 and bf16
decoding layers against plain references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spikegpt_ft.adapters import AdapterLinear, attach_adapters
from spikegpt_ft.inference import cast_weights, quantize_int8
from spikegpt_ft.model import SpikeGPT, SpikeGPTConfig
from spikegpt_ft.ops import Int8Linear, Linear, extension
from spikegpt_ft.ops import linear as linear_ops
from spikegpt_ft.ops.linear import STREAM_MAX_ROWS

#: Relative size of one rounding to bfloat16 (half an ulp: 8 significant bits).
BF16_ROUNDING = 2.0**-8


def _linear(n_in: int, n_out: int, bias: bool = False, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        layer.weight[0].zero_()  # an all-zero row must not divide by zero
        layer.weight[1] *= 50  # rows of very different ranges get their own scales
    return layer


def _fast(plain: nn.Linear) -> Linear:
    """The model's :class:`Linear` holding a copy of ``plain``'s weights."""
    layer = Linear(plain.in_features, plain.out_features, bias=plain.bias is not None, dtype=plain.weight.dtype)
    layer.load_state_dict(plain.state_dict())
    return layer


def test_every_weight_is_within_half_a_step_of_its_int8_value():
    layer = _linear(64, 48)
    q = Int8Linear(layer)
    w = layer.weight.detach().double()
    scale = q.scale.double()[:, None]
    assert q.weight_int8.dtype == torch.int8 and q.scale.dtype == torch.bfloat16
    assert q.weight_int8.abs().max() <= 127
    assert torch.all((w - q.weight_int8.double() * scale).abs() <= scale / 2)
    # the scale is as small as bfloat16 allows: one step down would push the largest weight past 127
    row_max = w.abs().amax(1)
    assert torch.all(row_max[1:] / 127 <= scale[1:, 0])
    smaller = torch.nextafter(q.scale[1:], torch.zeros((), dtype=torch.bfloat16)).double()
    assert torch.all(row_max[1:] / smaller > 127)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 17)])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_layer_computes_x_times_its_dequantized_weight(shape, bias):
    layer = _linear(64, 40, bias=bias, seed=1)
    q = Int8Linear(layer)
    x = torch.randn(*shape, 64).to(torch.bfloat16)
    reference = x.double() @ q.dequantized_weight().double().T
    if bias:
        reference = reference + q.bias.double()
    out = q(x)
    assert out.shape == (*shape, 40) and out.dtype == torch.bfloat16
    # float32 accumulation, then the output rounded to bfloat16 (and the bias added in bfloat16)
    error = (out.double() - reference).abs()
    assert torch.all(error <= 2 * BF16_ROUNDING * reference.abs() + 1e-3)


def test_layers_of_every_width_are_quantised_and_compute_their_dequantized_product():
    model = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 40), nn.Linear(40, 3)).to(torch.bfloat16)
    names = quantize_int8(model)
    assert names == ["0", "1", "2"] and all(isinstance(m, Int8Linear) for m in model)
    x = torch.randn(5, 64).to(torch.bfloat16)
    with torch.no_grad():
        out = model[2](model[1](x.new_ones(5, 8)))
    reference = (
        model[2].dequantized_weight().double()
        @ (model[1].dequantized_weight().double().sum(1) + model[1].bias.double()).to(torch.bfloat16).double()
        + model[2].bias.double()
    )
    assert out.shape == (5, 3)
    assert torch.allclose(out[0].double(), reference, rtol=2 * BF16_ROUNDING, atol=1e-2)


def _tiny_model() -> SpikeGPT:
    torch.manual_seed(0)
    model = SpikeGPT(SpikeGPTConfig(vocab_size=300, n_embd=64, n_layer=3, ffn_hidden=256, head_out=300))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def _parallel_and_stepped(model: SpikeGPT, ids: torch.Tensor):
    """The parallel logits of ``ids`` [B, T], the same token by token, and the state after the last."""
    with torch.inference_mode():
        parallel = model(ids)
        state, steps = model.init_state(ids.shape[0]), []
        for t in range(ids.shape[1]):
            logits, state = model.step(ids[:, t], state)
            steps.append(logits)
    return parallel, torch.stack(steps, 1), state


@pytest.mark.parametrize("adapter", [None, "lora", "spikelora"])
def test_int8_model_runs_recurrently_with_exactly_its_parallel_outputs(adapter):
    model = _tiny_model()
    if adapter:
        attach_adapters(model, adapter, r=4)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, AdapterLinear):
                    m.lora_B.normal_(0, 0.3)
    cast_weights(model, "int8")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear | Int8Linear)]
    assert linears and all(isinstance(m, Int8Linear) for m in linears)
    if adapter:
        adapters = [m for m in model.modules() if isinstance(m, AdapterLinear)]
        assert adapters and all(isinstance(m.base, Int8Linear) for m in adapters)
        assert all(m.lora_A.dtype == torch.bfloat16 for m in adapters)
    ids = torch.randint(0, 300, (3, 30), generator=torch.Generator().manual_seed(1))
    parallel, stepped, state = _parallel_and_stepped(model, ids)
    assert state.wkv.dtype == torch.float32
    assert torch.equal(stepped, parallel)


def test_bfloat16_model_runs_recurrently_with_exactly_its_parallel_outputs(monkeypatch):
    """Where the streaming kernel multiplies every row count, a decoded token gets its parallel pass's bits."""
    monkeypatch.setattr(linear_ops, "has_bf16_matrix_units", lambda: False)
    model = cast_weights(_tiny_model(), "bfloat16")
    ids = torch.randint(0, 300, (2, 25), generator=torch.Generator().manual_seed(3))
    parallel, stepped, _ = _parallel_and_stepped(model, ids)
    assert parallel.dtype == torch.bfloat16 and torch.equal(stepped, parallel)


@pytest.mark.parametrize("rows", [1, 2, 3, 64])
@pytest.mark.parametrize("n_in", [768, 64, 40, 5])
@pytest.mark.parametrize("bias", [False, True])
def test_decoding_linear_computes_in_float32_and_rounds_once(n_in, bias, rows, monkeypatch):
    """Bfloat16 rows through the compiled kernel: the float64 product of the bfloat16 values, up to
    float32 accumulation and one rounding to bfloat16 (widths that are and are not multiples of its 16 lanes)."""
    monkeypatch.setattr(linear_ops, "has_bf16_matrix_units", lambda: False)  # the kernel for every row count
    layer = _fast(_linear(n_in, 300, bias=bias, seed=2).to(torch.bfloat16))
    x = torch.randn(rows, 1, n_in).to(torch.bfloat16)
    with torch.no_grad():  # the weights are parameters: with gradients on, nn.Linear's path would run
        assert layer.uses_kernel(x)
        out = layer(x)
    w = layer.weight.double()
    reference = x.double() @ w.T + (layer.bias.double() if bias else 0)
    assert out.shape == (rows, 1, 300) and out.dtype == torch.bfloat16
    accumulation = n_in * 2.0**-24 * (x.double().abs() @ w.abs().T + (layer.bias.double().abs() if bias else 0))
    error = (out.double() - reference).abs()
    assert torch.all(error <= BF16_ROUNDING * reference.abs() + 2 * accumulation)


def test_decoding_linear_is_nn_linear_for_other_dtypes_and_gradients(monkeypatch):
    plain = _linear(64, 40, bias=True, seed=3).to(torch.bfloat16)
    layer = _fast(plain)
    rows = torch.randn(5, 64).to(torch.bfloat16)
    row = rows[:1].clone().requires_grad_()
    with torch.no_grad():
        assert not layer.uses_kernel(rows[:1].float())
        # where the CPU has bfloat16 matrix units but no AMX, oneDNN multiplies more than STREAM_MAX_ROWS rows
        monkeypatch.setattr(linear_ops, "has_bf16_matrix_units", lambda: True)
        monkeypatch.setattr(linear_ops, "amx_usable", lambda: False)
        assert layer.kernel_for(rows[:STREAM_MAX_ROWS]) == "stream" and layer.kernel_for(rows) is None
        assert torch.equal(layer(rows), plain(rows))
        monkeypatch.setattr(linear_ops, "has_bf16_matrix_units", lambda: False)
        assert layer.uses_kernel(rows)
    assert not layer.uses_kernel(row)  # a gradient is needed: nn.Linear's autograd path
    out = layer(row)
    out.sum().backward()
    assert torch.equal(out, plain(row)) and row.grad is not None


def test_every_linear_of_the_model_takes_the_fast_path_in_bfloat16_however_cast():
    model = _tiny_model()
    attach_adapters(model, "spikelora", r=4)
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    modules = dict(model.named_modules())
    assert names and all(type(modules[name]) is Linear for name in names)
    expected = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    row = torch.randn(1, model.config.n_embd).to(torch.bfloat16)
    for cast in (lambda m: cast_weights(m, "bfloat16"), lambda m: m.to(torch.bfloat16)):
        cast(model)
        with torch.no_grad():
            assert all(modules[name].uses_kernel(row) for name in names if modules[name].in_features == row.shape[1])
    got = model.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
    cast_weights(model, "int8")  # still possible: the decoding layers are nn.Linear
    assert all(isinstance(dict(model.named_modules())[name], Int8Linear) for name in names)


def test_bad_requests_are_refused_clearly():
    model = _tiny_model()
    with pytest.raises(ValueError, match="unknown weight precision 'int4'"):
        cast_weights(model, "int4")
    with pytest.raises(ValueError, match="CPU decoding option"):
        quantize_int8(_tiny_model().to("meta"))
    cast_weights(model, "int8")
    with pytest.raises(ValueError, match="int8 already"):
        cast_weights(model, "float32")


@pytest.mark.skipif(not linear_ops.amx_usable(), reason="this CPU cannot run the AMX kernel (no AMX-BF16)")
def test_amx_layer_follows_its_weight_changed_in_place_or_replaced():
    """The AMX layout is a copy of the weight, kept between products: every change to the weight must reach it."""
    layer = _fast(_linear(40, 70, seed=4).to(torch.bfloat16))
    rows = torch.randn(64, 40, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)

    def fresh_result() -> torch.Tensor:  # a new layer with the same weight: packed from scratch
        with torch.inference_mode(False):  # a plain weight, whose layout is kept (no warning)
            fresh = _fast(layer)
        return fresh(rows)

    with torch.inference_mode():
        assert layer.kernel_for(rows) == "amx"
        first = layer(rows)
        assert layer.packed_weight() is layer.packed_weight()  # kept while the weight is unchanged
        assert torch.equal(first, fresh_result())
    with torch.no_grad():
        layer.weight.mul_(2)  # exact in bfloat16, and so are the doubled float32 sums
    with torch.inference_mode():
        assert torch.equal(layer(rows), first * 2)
        layer.weight.add_(0.5)  # in place under inference mode
        assert torch.equal(layer(rows), fresh_result())
    layer.weight.data = torch.randn(70, 40).to(torch.bfloat16)  # the same parameter on other memory
    with torch.inference_mode():
        assert torch.equal(layer(rows), fresh_result())
    layer.weight = nn.Parameter(torch.randn(70, 40).to(torch.bfloat16))
    with torch.inference_mode():
        assert torch.equal(layer(rows), fresh_result())


def _counting_f_linear(monkeypatch) -> list[tuple[int, ...]]:
    """Record the input shape of every F.linear call from now on (the calls still compute)."""
    calls, real = [], nn.functional.linear

    def counted(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(nn.functional, "linear", counted)
    return calls


def test_adapter_matrices_stream_where_a_linear_layer_would(monkeypatch):
    """An adapter's A and B (no Linear of their own) take the streaming kernel in bfloat16 inference on the CPU, as
    the compiled step multiplies them, up to four rows; more rows, or a gradient needed: F.linear."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 24, generator=g).to(torch.bfloat16)
    x = torch.randn(2, 3, 24, generator=g).to(torch.bfloat16)
    calls = _counting_f_linear(monkeypatch)
    with torch.no_grad():
        one = linear_ops.unpacked_linear(x[:1, :1], w)
        assert not calls and one.shape == (1, 1, 40)
        assert torch.equal(one.view(1, 40), extension().stream_linear(x[0, :1], w, None, None, "auto"))
        row = x[0, :1].double()
        reference, terms = row @ w.double().T, row.abs() @ w.double().abs().T
        # float32 sums of 24 terms, then one rounding to bfloat16
        bound = 27 * 2.0**-24 * terms * (1 + 2.0**-8) + 2.0**-8 * reference.abs()
        assert torch.all((one.view(1, 40).double() - reference).abs() <= bound)
        four = linear_ops.unpacked_linear(x.view(6, 24)[:STREAM_MAX_ROWS], w)
        assert not calls and torch.equal(four, extension().stream_linear(x.view(6, 24)[:4], w, None, None, "auto"))
        many = linear_ops.unpacked_linear(x, w)
        assert calls == [(2, 3, 24)] and torch.equal(many, nn.functional.linear(x, w))
    calls.clear()
    out = linear_ops.unpacked_linear(x[:1, :1], w.clone().requires_grad_())
    assert out.requires_grad and calls == [(1, 1, 24)]


def test_a_bfloat16_adapted_layer_multiplies_its_adapter_with_the_streaming_kernel(monkeypatch):
    """AdapterLinear.forward at one row: the base's and the adapter's products all streamed, none through F.linear
    (the compiled step's way, which tests/test_decode_step.py holds bitwise to model.step)."""
    model = attach_adapters(_tiny_model(), kind="lora", r=4).eval()
    cast_weights(model, "bfloat16")
    layer = model.blocks[0].att.key
    assert isinstance(layer, AdapterLinear)
    calls = _counting_f_linear(monkeypatch)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
        x = torch.randn(1, 1, layer.in_features, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
        stream = lambda rows, w: extension().stream_linear(rows.reshape(1, -1), w, None, None, "auto")  # noqa: E731
        expected = stream(x, layer.base.weight) + stream(stream(x, layer.lora_A), layer.lora_B) * layer.scaling
        assert torch.equal(layer(x).view(1, -1), expected)
    assert not calls
