"""GPU checks: the CUDA WKV kernel and the whole model on CUDA against the CPU path.

These need a CUDA device and are skipped where there is none (CI has none); run them on a GPU
machine with `python -m pytest tests/test_gpu.py`.
"""

from __future__ import annotations

import pytest
import torch
from helpers import FIXTURES, tiny_model

from spikegpt_ft import load_model
from spikegpt_ft.ops.wkv import fresh_state, wkv

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("chunk_len", [0, 1, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 17, 40), (1, 3000, 8), (3, 64, 200)])
def test_cuda_kernel_matches_cpu_kernel(dtype, shape, chunk_len, gated):
    """The chunked CUDA kernels (0: their own choice of chunks) against the CPU's single sweep, from a
    carried state, with and without the fused receptance gate."""
    B, T, C = shape
    g = torch.Generator().manual_seed(0)
    td, tf = torch.rand(C, generator=g) * 4 - 3, torch.rand(C, generator=g) * 2 - 1
    k, v = torch.randn(B, T, C, generator=g).to(dtype), torch.randn(B, T, C, generator=g).to(dtype)
    r = (torch.randn(B, T, C, generator=g) * 3).to(dtype)
    gy = torch.randn(B, T, C, generator=g)
    _, start = wkv(td, tf, torch.randn(B, 5, C, generator=g), torch.randn(B, 5, C, generator=g), fresh_state(B, C))
    inputs = (td, tf, k, v, r) if gated else (td, tf, k, v)
    cpu = [x.detach().float().requires_grad_() for x in inputs]  # leaves, each with its own .grad
    gpu = [x.detach().cuda().requires_grad_() for x in inputs]
    y_cpu, s_cpu = wkv(*cpu[:4], start, receptance=cpu[4] if gated else None)
    y_gpu, s_gpu = wkv(*gpu[:4], start.cuda(), chunk_len, receptance=gpu[4] if gated else None)
    (y_cpu * gy).sum().backward()
    (y_gpu.float() * gy.cuda()).sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert (y_gpu.float().cpu() - y_cpu).abs().max() < tol
    assert (s_gpu.cpu() - s_cpu).abs().max() < 1e-3 * s_cpu.abs().max()
    grad_tol = max(1e-3, torch.finfo(dtype).eps)  # k's, v's and r's gradients come rounded to their dtype
    for a, b in zip(gpu, cpu, strict=True):
        assert (a.grad.float().cpu() - b.grad).abs().max() <= grad_tol * b.grad.abs().max()


@pytest.mark.parametrize("name", ["f1", "f2"])
def test_fixture_parity_on_cuda(name):
    expect = torch.load(FIXTURES / f"{name}_expect.pt", map_location="cpu", weights_only=True)
    model = load_model(FIXTURES / f"{name}_model.pth", device="cuda")
    logits = model(expect["ids"].cuda()).cpu()
    assert (logits - expect["logits"]).abs().max() < 1e-3


@torch.no_grad()
def test_recurrent_equals_parallel_on_cuda():
    model = tiny_model().cuda()
    ids = torch.randint(0, 97, (4, 33), device="cuda")
    parallel = model(ids)
    state, outs = model.init_state(4), []
    for t in range(ids.shape[1]):
        logits, state = model.step(ids[:, t], state)
        outs.append(logits)
    assert (torch.stack(outs, 1) - parallel).abs().max() < 1e-4


@pytest.mark.parametrize("adapter", ["none", "lora", "spikelora"])
def test_training_step_never_syncs_with_the_host(adapter):
    """A bf16-autocast training step (forward, loss, the running train loss, backward) on CUDA with sync
    debugging set to "error": a host-device sync made by a PyTorch call (ours, SpikingJelly's, torchmetrics')
    raises. (The kernels' own CUDA calls are not seen by it; they make no sync.)"""
    from spikegpt_ft.adapters import AdapterConfig
    from spikegpt_ft.training import SpikeGPTClassifier, build_base, build_classifier

    torch.manual_seed(0)
    base, _ = build_base("scratch", "tiny")
    model = build_classifier(base, 2, None if adapter == "none" else AdapterConfig(kind=adapter))
    module = SpikeGPTClassifier(model, 2).cuda()  # the metrics too, as Lightning does
    module.log = lambda *a, **k: None  # no trainer attached
    batch = {"input_ids": torch.randint(0, model.config.vocab_size, (4, 32)), "lengths": torch.tensor([32, 20, 9, 1]),
             "labels": torch.tensor([0, 1, 1, 0])}  # fmt: skip
    batch["mask"] = torch.arange(32) < batch["lengths"][:, None]
    batch = {k: v.cuda() for k, v in module.on_before_batch_transfer(batch, 0).items()}
    module.training_step(batch, 0).backward()  # warm-up: kernels load, caches fill
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module.training_step(batch, 0)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


@torch.no_grad()
def test_cuda_graph_stepper_reproduces_model_step():
    """decoding.GraphedStepper's captured graph against eager model.step on CUDA, SpikeLoRA gates included;
    a replay never syncs with the host, and in-place weight changes are seen by the graph."""
    from spikegpt_ft.adapters import attach_adapters
    from spikegpt_ft.inference.decoding import GraphedStepper

    model = attach_adapters(tiny_model(seed=5), kind="spikelora", r=4)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.5)
    model = model.cuda().eval()
    rows = torch.randint(0, 97, (20, 3), generator=torch.Generator().manual_seed(0))
    stepper = GraphedStepper(model, 3)
    assert stepper.uses_graph
    fresh = model.init_state(3)
    assert _max_diff(stepper.state().wkv, fresh.wkv) == 0  # the warm-up steps were undone
    assert all(float(v.abs().max()) == 0 for v in stepper.state().membranes.values())
    state = fresh
    for tokens in rows:
        expected, state = model.step(tokens.cuda(), state)
        assert _max_diff(stepper.step(tokens), expected) < 1e-5  # CPU tokens: checked on the host
    got = stepper.state()
    for field in ("att_shift", "ffn_shift", "wkv"):
        assert _max_diff(getattr(got, field), getattr(state, field)) < 1e-5
    assert max(_max_diff(got.membranes[k], v) for k, v in state.membranes.items()) < 1e-5

    stepper.reset()
    first = rows[0].cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits = stepper.step(first, check_ids=False).clone()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert _max_diff(logits, model.step(first, model.init_state(3))[0]) < 1e-5
    stepper.reset()
    model.head.weight.mul_(2)
    assert _max_diff(stepper.step(first), 2 * logits) < 1e-4


@torch.no_grad()
def test_generation_and_streaming_on_cuda_go_through_the_graph_and_match_the_cpu(monkeypatch):
    from spikegpt_ft import inference
    from spikegpt_ft.inference.decoding import GraphedStepper

    built = []

    class Recording(GraphedStepper):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self.uses_graph)

    monkeypatch.setattr(inference, "GraphedStepper", Recording)
    lm, prompt = tiny_model(vocab=97, seed=3), [5, 9, 42, 7]
    on_cpu = inference.generate(lm, prompt, 16, temperature=0.0)
    assert built == []
    assert inference.generate(lm.cuda(), prompt, 16, temperature=0.0) == on_cpu
    assert built == [True]
    clf, text = tiny_model(vocab=97, seed=4), list(range(3, 30))
    clf.reset_head(2)
    running_cpu = torch.stack(list(inference.stream(clf, text)))
    running_gpu = torch.stack(list(inference.stream(clf.cuda(), text)))
    assert built == [True, True]
    assert _max_diff(running_gpu, running_cpu) < 1e-4
