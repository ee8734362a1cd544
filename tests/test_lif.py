"""The compiled CPU LIF neuron (spikegpt_ft.lif) against SpikingJelly's own ``LIFNode`` on the CPU.

SpikingJelly's CPU path (a Python loop of torch ops, differentiated by torch's autograd) is the
reference: our spikes and final membrane must be bitwise equal to it, our gradients equal within 1e-6
relative. The LIF is a step function, so a float64 gradcheck does not apply; SpikingJelly's surrogate
gradient is the expectation instead.
"""

from __future__ import annotations

import math

import pytest
import torch
from spikingjelly.activation_based import neuron, surrogate

from spikegpt_ft.model import make_lif
from spikegpt_ft.ops import lif
from spikegpt_ft.ops.extension import extension
from spikegpt_ft.ops.lif import CompiledLIFNode

SPIKEGPT = {
    "v_reset": 0.0,
    "decay_input": True,
    "detach_reset": False,
    "surrogate_function": surrogate.ATan(alpha=2.0),
    "step_mode": "m",
}


def neurons(tau: float, v_threshold: float, **overrides) -> tuple[neuron.LIFNode, CompiledLIFNode]:
    """SpikingJelly's LIFNode and ours, with the same settings (SpikeGPT's unless overridden)."""
    kwargs = {**SPIKEGPT, "tau": tau, "v_threshold": v_threshold, **overrides}
    return neuron.LIFNode(**kwargs), CompiledLIFNode(**kwargs)


def charge(x: torch.Tensor, v: torch.Tensor, tau: float, v_reset: float) -> torch.Tensor:
    """The charged membrane ``h`` of one step (decay_input = True) in float32."""
    return v + (x - (v - v_reset)) / tau


def nudge(x: torch.Tensor, ulps: torch.Tensor) -> torch.Tensor:
    """``x`` moved by ``ulps`` (an integer per element) steps between adjacent floats of its dtype."""
    up, down = torch.full_like(x, math.inf), torch.full_like(x, -math.inf)
    while bool(ulps.any()):
        x = torch.where(ulps > 0, torch.nextafter(x, up), torch.where(ulps < 0, torch.nextafter(x, down), x))
        ulps = ulps - ulps.sign()
    return x


def sequence(
    shape: tuple[int, ...], tau: float, v_threshold: float, v0: torch.Tensor, gen: torch.Generator, v_reset: float = 0.0
):
    """Random inputs ``[T, *S]`` where, at step 0 and step T // 2, three quarters of the channels charge to the
    threshold itself or to the float just above or below it (from the membrane SpikingJelly has there); also
    returns the ``h`` of those channels."""
    x = torch.randn(shape, generator=gen) * 1.5
    crafted = []
    for t in sorted({0, shape[0] // 2}):
        before, _ = neurons(tau, v_threshold, v_reset=v_reset)
        before.v = v0.clone()
        if t > 0:
            before(x[:t])
        v = before.v if isinstance(before.v, torch.Tensor) else torch.full(shape[1:], before.v)
        # aim each chosen channel at the threshold or the float just above or below it: solve for x in
        # float64, then walk x one float at a time towards the aim (h is monotone in x)
        th = torch.tensor(v_threshold)
        aims = torch.stack([torch.nextafter(th, th - 1), th, torch.nextafter(th, th + 1)])
        aim = aims[torch.randint(0, 3, v.shape, generator=gen)]
        near = ((aim.double() - v.double()) * tau + (v.double() - v_reset)).float()
        for _ in range(4):
            h = charge(near, v, tau, v_reset)
            near = nudge(near, (aim > h).long() - (aim < h).long())
        chosen = torch.rand(v.shape, generator=gen) < 0.75
        x[t] = torch.where(chosen, near, x[t])
        crafted.append(charge(x[t], v, tau, v_reset)[chosen])
    return x, torch.cat(crafted)


def run(node: neuron.LIFNode, x: torch.Tensor, v0: torch.Tensor | None, grad_spikes, grad_v_last):
    """Spikes, final membrane and the gradients w.r.t. ``x`` and ``v0`` of ``sum(spikes * grad_spikes) +
    sum(v_last * grad_v_last)``, from the membrane ``v0`` (None: a fresh neuron)."""
    x = x.clone().requires_grad_(True)
    inputs = [x]
    if v0 is not None:
        node.v = v0.clone().requires_grad_(True)
        inputs.append(node.v)
    spikes = node(x)
    v_last = node.v
    grads = torch.autograd.grad((spikes * grad_spikes).sum() + (v_last * grad_v_last).sum(), inputs)
    return spikes.detach(), v_last.detach(), grads


@pytest.mark.parametrize("shape", [(64, 3, 41), (1, 3, 41), (64, 150), (1, 150)], ids=str)
@pytest.mark.parametrize("v_threshold", [1.0, 0.3])
@pytest.mark.parametrize("tau", [2.0, 1.5, 3.0])
@pytest.mark.parametrize("carried", [False, True], ids=["fresh", "carried"])
@pytest.mark.parametrize("v_reset", [0.0, 0.125])  # SpikeGPT's, and one where the reset term counts
def test_matches_spikingjelly(shape, tau, v_threshold, carried, v_reset):
    gen = torch.Generator().manual_seed(hash((shape, tau, v_threshold, carried, v_reset)) % 2**31)
    v0 = torch.randn(shape[1:], generator=gen) * 0.6 if carried else torch.full(shape[1:], v_reset)
    x, h = sequence(shape, tau, v_threshold, v0, gen, v_reset)
    # The crafted steps charge to the threshold itself and to the floats just above and below it. (Not
    # always all three when every channel starts from one membrane v_reset != 0 for a single step: then the
    # float grid of x / tau can miss one of them for all channels at once.)
    th = torch.tensor(v_threshold)
    aims = (th, torch.nextafter(th, torch.tensor(math.inf)), torch.nextafter(th, torch.tensor(-math.inf)))
    hits = [int((h == at).sum()) for at in aims]
    if carried or v_reset == 0.0 or shape[0] > 1:
        assert min(hits) >= 4, hits
    else:
        assert sum(hits) >= 8, hits
    grad_spikes = torch.randn(shape, generator=gen)
    grad_v_last = torch.randn(shape[1:], generator=gen)

    reference, ours = neurons(tau, v_threshold, v_reset=v_reset)
    assert ours.uses_kernel(x)
    start = v0 if carried else None
    ref_spikes, ref_v, ref_grads = run(reference, x, start, grad_spikes, grad_v_last)
    spikes, v, grads = run(ours, x, start, grad_spikes, grad_v_last)

    assert ref_spikes.sum() >= 10 and (1 - ref_spikes).sum() >= 10  # both outcomes are exercised
    assert torch.equal(spikes, ref_spikes)
    assert torch.equal(v, ref_v)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert ref.abs().max() > 0
        torch.testing.assert_close(grad, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
def test_forward_matches_in_every_grad_mode(mode):
    """Without autograd SpikingJelly runs another CPU function (inference mode skips its autograd kernel)."""
    gen = torch.Generator().manual_seed(1)
    v0 = torch.randn(4, 50, generator=gen)
    x, _ = sequence((32, 4, 50), 1.5, 0.3, v0, gen)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}[mode]
    outputs = []
    for node in neurons(1.5, 0.3):
        node.v = v0.clone()
        with context():
            outputs.append((node(x), node.v))
    (ref_spikes, ref_v), (spikes, v) = outputs
    assert torch.equal(spikes, ref_spikes) and torch.equal(v, ref_v)


def test_node_state_like_spikingjelly():
    """``.v`` before, between and after calls, reset and forward hooks behave as in SpikingJelly."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(20, 2, 30, generator=gen) * 2
    reference, ours = neurons(2.0, 1.0)
    seen = []
    ours.register_forward_hook(lambda module, args, out: seen.append(out))
    for node in (reference, ours):
        node(x[:12])
        node(x[12:])  # carries the membrane of the first call
    assert isinstance(ours.v, torch.Tensor) and torch.equal(ours.v, reference.v)
    assert len(seen) == 2 and seen[1].shape == (8, 2, 30)
    ours.reset()
    assert ours.v == 0.0 and ours.v_seq is None
    ours.v = torch.ones(7)  # a membrane of another shape is replaced by v_reset, as SpikingJelly does
    reference.v = torch.ones(7)
    assert torch.equal(ours(x), reference(x)) and torch.equal(ours.v, reference.v)


def test_one_step_per_call_equals_the_sequence():
    """Decoding feeds T = 1 per call; carrying ``.v`` must give the spikes of one call over the sequence."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 1, 96, generator=gen) * 2
    node = make_lif()
    whole = node(x)
    last = node.v
    node.reset()
    steps = torch.cat([node(x[t : t + 1]) for t in range(x.shape[0])])
    assert torch.equal(steps, whole) and torch.equal(node.v, last)


def test_make_lif_builds_the_compiled_node():
    node = make_lif(0.5, 3.0)
    assert isinstance(node, CompiledLIFNode) and isinstance(node, neuron.LIFNode)
    assert (node.tau, node.v_threshold, node.v_reset, node.step_mode) == (3.0, 0.5, 0.0, "m")
    assert node.decay_input and not node.detach_reset and type(node.surrogate_function) is surrogate.ATan
    x = torch.randn(5, 3, 8, requires_grad=True)
    assert type(node(x).grad_fn).__name__ == "_LIFFunctionBackward"


@pytest.mark.parametrize(
    "case",
    [
        {"dtype": torch.float64},
        {"detach_reset": True},
        {"v_reset": None},
        {"decay_input": False},
        {"store_v_seq": True},
        {"surrogate_function": surrogate.Sigmoid(alpha=4.0)},
        {"surrogate_function": surrogate.ATan(alpha=2.0, spiking=False)},
    ],
    ids=lambda case: "-".join(f"{k}={v}" for k, v in case.items()),
)
def test_defers_to_spikingjelly(case, monkeypatch):
    """Inputs and settings the kernel does not implement run SpikingJelly's code, with its results."""
    case = dict(case)
    dtype = case.pop("dtype", torch.float32)

    def no_kernel():
        raise AssertionError("the compiled kernel ran for a case it does not implement")

    monkeypatch.setattr(lif, "extension", no_kernel)
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(16, 3, 20, generator=gen) * 2).to(dtype)
    grad_spikes = torch.randn(x.shape, generator=gen, dtype=dtype)
    reference, ours = neurons(1.5, 0.3, **case)
    assert not ours.uses_kernel(x)
    ref_spikes, ref_v, (ref_grad,) = run(reference, x, None, grad_spikes, torch.zeros(x.shape[1:], dtype=dtype))
    spikes, v, (grad,) = run(ours, x, None, grad_spikes, torch.zeros(x.shape[1:], dtype=dtype))
    assert spikes.dtype == dtype and torch.equal(spikes, ref_spikes) and torch.equal(v, ref_v)
    assert torch.equal(grad, ref_grad)


def test_single_step_mode_is_spikingjelly(monkeypatch):
    monkeypatch.setattr(lif, "extension", None)  # any use of the kernel fails
    reference, ours = neurons(2.0, 1.0, step_mode="s")
    x = torch.randn(4, 10) * 2
    for t in range(3):
        assert torch.equal(ours(x * t), reference(x * t))
    assert torch.equal(ours.v, reference.v)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runs_spikingjelly_kernels():
    x = torch.randn(32, 4, 64, device="cuda") * 2
    reference, ours = neurons(2.0, 1.0)
    assert not ours.uses_kernel(x)
    assert torch.equal(ours(x), reference(x)) and torch.equal(ours.v, reference.v)


def test_higher_order_backward_raises():
    node = make_lif()
    x = torch.randn(8, 2, 16, requires_grad=True) * 3
    with pytest.raises(RuntimeError, match="first order only"):
        torch.autograd.grad((node(x) * torch.randn(8, 2, 16)).sum(), x, create_graph=True)


def test_kernel_rejects_bad_inputs():
    ops = extension()
    x, v0 = torch.zeros(4, 2, 3), torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="x must be a float32 CPU tensor"):
        ops.lif_forward(x.double(), v0, 2.0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match=r"v0 must have the shape \[2, 3\]"):
        ops.lif_forward(x, torch.zeros(6), 2.0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="at least 2 dimensions"):
        ops.lif_forward(torch.zeros(4), torch.zeros(()), 2.0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="tau must be finite and positive"):
        ops.lif_forward(x, v0, math.nan, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="grad_spikes"):
        ops.lif_backward(torch.zeros(3, 2, 3), v0, x, 2.0, 1.0, 0.0, 2.0)


def test_kernel_reads_strided_inputs():
    """Non-contiguous inputs (a transposed view, as ``fire`` would pass without its copy) give the same results."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 40, 12, generator=gen).transpose(0, 1) * 2  # [40, 6, 12], not contiguous
    v0 = torch.randn(12, 6, generator=gen).t()
    ops = extension()
    expected = ops.lif_forward(x.contiguous(), v0.contiguous(), 1.5, 0.3, 0.0)
    for got, want in zip(ops.lif_forward(x, v0, 1.5, 0.3, 0.0), expected, strict=True):
        assert torch.equal(got, want)
    grads = (torch.randn(6, 40, 12, generator=gen).transpose(0, 1), torch.randn(12, 6, generator=gen).t())
    want = ops.lif_backward(grads[0].contiguous(), grads[1].contiguous(), expected[2], 1.5, 0.3, 0.0, 2.0)
    got = ops.lif_backward(*grads, expected[2], 1.5, 0.3, 0.0, 2.0)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
