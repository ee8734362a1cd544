"""Benchmarks: the WKV kernel, the LIF neuron, training steps, parallel forward and recurrent decoding.

``spikegpt-ft bench {wkv,lif,train,forward,recurrent,all} [--device cuda|cpu] [--dtype ...] [--json OUT]`` (or
``python -m spikegpt_ft.tools.bench ...``; ``recurrent`` steps through
:class:`~spikegpt_ft.inference.GraphedStepper`: on CUDA a CUDA graph, on the CPU the compiled step;
``--eager`` times ``model.step`` itself).

Every case is warmed up, then timed ``repeats`` times; the median is reported (and every sample is
kept in the JSON). On CUDA each sample is bracketed by CUDA events and synchronised, and the peak
memory is ``torch.cuda.max_memory_allocated`` since the case started. On the CPU the peak is the
process's maximum resident set size (``resource.getrusage``), which only grows over the process:
read it as "peak so far", not as the cost of that case alone.

Weights are random (no checkpoint needed: :func:`spikegpt_ft.model.init_random_spiking`, so that the LIFs
fire as in a trained model) at the SpikeGPT-216M shape by default (18 layers x 768, vocabulary 50277,
FFN 3072); ``--layers/--embd/--vocab`` shrink it.

Decoding one token reads every linear weight of the model once, so a recurrent step is bounded below by
the time the machine takes to read them. Beside each ``recurrent`` row the time to read all the model's
linear weights once (on the CPU by the kernels' own pure read, ``read_bytes``; timed as the steps are) and the
ratio ``step time / read time`` are reported: the ratio compares across machines where the milliseconds do not.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..inference import WEIGHT_PRECISIONS, GraphedStepper, cast_weights
from ..model import SpikeGPT, SpikeGPTConfig, init_random_spiking, make_lif
from ..ops import Int8Linear, extension, fresh_state, wkv
from ..ops.linear import STREAM_MAX_ROWS, product_kernel, stream_prefetch
from ..system import cpu_flags, device_name, peak_memory_mb

#: The WKV shapes of the issue, (B, T, C).
WKV_SHAPES = ((32, 64, 768), (8, 1024, 768), (128, 64, 768))
#: The LIF shapes (T, B, C): a block's LIF in a 216M training step, a SpikeLoRA r16 gate there, one decoding step.
LIF_SHAPES = ((64, 32, 768), (64, 32, 16), (1, 1, 768))
SECTIONS = ("wkv", "lif", "train", "forward", "recurrent")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones (CUDA-synchronised).

    Also leaves the process CPU seconds per call in ``time_fn.cpu_s`` (on a CPU that other processes share,
    wall time much above ``cpu / threads`` means the run was starved).
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    cpu0 = time.process_time()
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    time_fn.cpu_s = (time.process_time() - cpu0) / repeats
    return samples


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


#: CPU features worth recording beside CPU timings (vector widths and matrix units).
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "asimd", "sve")


def environment(device: torch.device, dtype: torch.dtype, argv: list[str]) -> dict:
    """Where the numbers come from: device, versions, threads, load, and the command (``argv``: bench's arguments)."""
    return {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_simd_flags": sorted(f for f in SIMD_FLAGS if f in cpu_flags()),
        # the targets of the compiled CPU loops (one alone where SPIKEGPT_FT_CPU_LOOPS asked for it)
        "cpu_loops": extension().cpu_loops(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "dtype": str(dtype).removeprefix("torch."),
        "command": shlex.join(["spikegpt-ft", "bench", *argv]),
    }


def _result(section: str, name: str, shape: dict, samples: list[float], device: torch.device, **extra) -> dict:
    peak, peak_kind = peak_memory_mb(device)
    return {
        "section": section,
        "name": name,
        "shape": shape,
        "median_ms": statistics.median(samples) * 1e3,
        "min_ms": min(samples) * 1e3,
        "times_ms": [s * 1e3 for s in samples],
        "peak_mem_mb": peak,
        "peak_mem_kind": peak_kind,
        "process_cpu_ms_per_call": time_fn.cpu_s * 1e3,
        "load_average_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        **extra,
    }


# --------------------------------------------------------------------------------------------- models


def random_model(args: argparse.Namespace, device: torch.device, head_out: int | None = None) -> SpikeGPT:
    """A SpikeGPT with random weights whose LIFs fire (seed 0) at the requested shape (216M by default)."""
    torch.manual_seed(0)
    model = SpikeGPT(SpikeGPTConfig.sized(args.layers, args.embd, args.vocab, head_out=head_out))
    return init_random_spiking(model, seed=0).to(device)


def linear_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weight tensors of every linear layer of ``model``: blocks and head, int8 ones with their scales.

    Not the embedding (a step reads one row of it) nor adapters' matrices (parameters, not layers).
    """
    weights = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            weights.append(m.weight)
        elif isinstance(m, Int8Linear):
            weights += [m.weight_int8, m.scale]
    return weights


def time_weight_read(model: nn.Module, device: torch.device, warmup: int, repeats: int) -> dict:
    """Seconds to read every linear weight of ``model`` once, and their bytes: the limit of a decoding step.

    On the CPU the bytes are read by the kernels' own pure read (``read_bytes``, ``csrc/memory_cpu.cpp``): one
    sequential stream per thread at the memory's speed, where ATen's reductions, which would stand in for a read,
    run well below it (a 64-bit-word ``max`` took 1.5 x as long on the Intel Xeon of BENCHMARKS.md). It is timed
    in each of its ways (no software prefetch, or one of the streaming kernels', ``read_prefetches``) and the
    fastest is kept (``weight_read_prefetch``): which way reads fastest depends on the machine, and a reference
    slower than the machine's read would flatter every step measured against it. On a GPU, a ``max`` of each
    tensor's 64-bit words (a ``sum`` where they are not whole words). The median of ``repeats`` timed reads after
    ``warmup`` untimed ones.
    """
    weights = [w.detach().reshape(-1) for w in linear_weights(model)]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    if device.type == "cpu":
        medians = {
            prefetch: statistics.median(
                time_fn(functools.partial(extension().read_bytes, weights, prefetch), device, warmup, repeats)
            )
            for prefetch in extension().read_prefetches()
        }
        prefetch = min(medians, key=medians.__getitem__)
        med = medians[prefetch]
    else:
        words = [w.view(torch.int64) if w.numel() * w.element_size() % 8 == 0 else None for w in weights]

        def read():
            with torch.inference_mode():
                for w, as_words in zip(weights, words, strict=True):
                    w.sum() if as_words is None else as_words.max()

        prefetch = None
        med = statistics.median(time_fn(read, device, warmup, repeats))
    return {
        "weight_read_ms": med * 1e3,
        "weight_bytes": nbytes,
        "weight_read_gb_per_s": nbytes / med / 1e9,
        "weight_read_prefetch": prefetch,
    }


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------- sections


def _wkv_case(B: int, T: int, C: int, args, device, dtype) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(0)
    w = torch.rand(C, generator=g).mul(4).sub(3).to(device)  # time_decay in [-3, 1)
    u = torch.rand(C, generator=g).mul(2).sub(1).to(device)
    k, v, r, gy = (torch.randn(B, T, C, generator=g).to(device, dtype) for _ in range(4))
    state = fresh_state(B, C, device)
    wg, ug = w.clone().requires_grad_(), u.clone().requires_grad_()
    kg, vg, rg = k.clone().requires_grad_(), v.clone().requires_grad_(), r.clone().requires_grad_()

    def fwd():
        with torch.no_grad():
            wkv(w, u, k, v, state)

    def backward(out):
        torch.autograd.backward(out, gy)
        wg.grad = ug.grad = kg.grad = vg.grad = rg.grad = None

    def fwd_bwd():
        backward(wkv(wg, ug, kg, vg, state)[0])

    # the time mix's sigmoid(r) * wkv: fused into the kernels, and as torch ops after the plain kernel
    def gated_fused_fwd_bwd():
        backward(wkv(wg, ug, kg, vg, state, receptance=rg)[0])

    def gated_separate_fwd_bwd():
        backward(torch.sigmoid(rg) * wkv(wg, ug, kg, vg, state)[0])

    cases = {"wkv_fwd": fwd, "wkv_fwd_bwd": fwd_bwd, "wkv_gate_fused_fwd_bwd": gated_fused_fwd_bwd,
             "wkv_gate_separate_fwd_bwd": gated_separate_fwd_bwd}  # fmt: skip
    results = []
    for name, fn in cases.items():
        _reset_peak(device)
        samples = time_fn(fn, device, args.warmup, args.repeats)
        tput = B * T / statistics.median(samples)
        results.append(_result("wkv", name, {"B": B, "T": T, "C": C}, samples, device, tokens_per_s=tput))
    return results


def bench_wkv(args, device, dtype) -> list[dict]:
    """WKV forward and forward+backward, and the gated ``sigmoid(r) * wkv`` forward+backward with the gate fused
    into the kernels and as separate torch ops; ``k, v, r`` in ``dtype`` (the CPU kernel computes in float32)."""
    custom = args.batch is not None or args.tokens is not None
    shapes = ((args.batch or 32, args.tokens or 64, args.embd),) if custom else WKV_SHAPES
    return [r for B, T, C in shapes for r in _wkv_case(B, T, C, args, device, dtype)]


def _lif_cases(node, x: torch.Tensor, grad: torch.Tensor) -> dict[str, Callable[[], object]]:
    def fwd():
        node.reset()
        with torch.no_grad():
            node(x)

    xg = x.clone().requires_grad_()

    def fwd_bwd():
        node.reset()
        torch.autograd.backward(node(xg), grad)
        xg.grad = None

    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def bench_lif(args, device, dtype) -> list[dict]:
    """The model's LIF layer against SpikingJelly's own ``LIFNode`` with the same settings, and against one
    elementwise op over the same tensor (``x * 1``: the memory-bound floor any LIF kernel is judged by).

    Float32 input, ``[T, B, C]`` time-major as the model feeds it. On CUDA both LIFs are SpikingJelly's
    kernels (the model's node defers to them there), so the rows show whether those are fast at small T.
    """
    from spikingjelly.activation_based import neuron

    model_node = make_lif()
    sj_node = neuron.LIFNode(
        tau=model_node.tau, v_threshold=model_node.v_threshold, v_reset=model_node.v_reset,
        decay_input=model_node.decay_input, detach_reset=model_node.detach_reset,
        surrogate_function=model_node.surrogate_function, step_mode="m",
    )  # fmt: skip
    results = []
    for T, B, C in LIF_SHAPES:
        g = torch.Generator(device="cpu").manual_seed(0)
        x = (torch.randn(T, B, C, generator=g) * 1.5).to(device)
        grad = torch.randn(T, B, C, generator=g).to(device)
        cases = {f"lif_model_{k}": fn for k, fn in _lif_cases(model_node, x, grad).items()}
        cases |= {f"lif_spikingjelly_{k}": fn for k, fn in _lif_cases(sj_node, x, grad).items()}
        cases["elementwise_floor"] = lambda: torch.mul(x, 1.0)  # noqa: B023 - called within this iteration
        for name, fn in cases.items():
            _reset_peak(device)
            samples = time_fn(fn, device, args.warmup, args.repeats)
            results.append(_result("lif", name, {"T": T, "B": B, "C": C}, samples, device))
    return results


def _train_model(args, device, mode: str) -> SpikeGPT:
    model = random_model(args, device)
    model.reset_head(2)
    if mode != "full":
        from ..adapters import attach_adapters

        attach_adapters(model, kind=mode, r=args.rank)
        for p in model.head.parameters():
            p.requires_grad_(True)
    return model.train()


def _train_case(args, device, dtype, mode: str, B: int, T: int) -> dict:
    model = _train_model(args, device, mode)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, args.vocab, (B, T), generator=g).to(device)
    labels = torch.randint(0, 2, (B,), generator=g).to(device)
    # float16 steps scale the loss, as Lightning's "16-mixed" does (its inf check is a host sync per step)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step():
        with _autocast(device, dtype):
            # every sequence is full length: its last real token is at -1; ids drawn in range, as the
            # training loop checks them on the host, so the step has no host sync
            logits = model(ids, check_ids=False)[:, -1]
        loss = F.cross_entropy(logits.float(), labels)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    _reset_peak(device)
    samples = time_fn(step, device, args.warmup, args.repeats)
    name = "full_finetune_step" if mode == "full" else f"{mode}_r{args.rank}_step"
    return _result(
        "train",
        name,
        {"B": B, "T": T},
        samples,
        device,
        trainable_params=sum(p.numel() for p in params),
        tokens_per_s=B * T / statistics.median(samples),
        autocast=None if dtype == torch.float32 else str(dtype).removeprefix("torch."),
        grad_scaler=scaler.is_enabled(),
    )


def bench_train(args, device, dtype) -> list[dict]:
    """One optimisation step (forward, backward, AdamW) of a 2-class classifier read at the last token."""
    B, T = args.batch or args.train_batch, args.tokens or 64
    return [_train_case(args, device, dtype, mode, B, T) for mode in args.train_modes]


def bench_forward(args, device, dtype) -> list[dict]:
    """Parallel inference forward (LM head) at ``--fwd-batch x --fwd-tokens``, weights in ``dtype``."""
    B, T = args.fwd_batch, args.fwd_tokens
    model = random_model(args, device).to(dtype).eval()
    ids = torch.randint(0, args.vocab, (B, T), generator=torch.Generator().manual_seed(0)).to(device)

    def fwd():
        with torch.inference_mode():
            model(ids, check_ids=False)  # drawn in range; on CUDA the check would be a sync in the timed region

    _reset_peak(device)
    samples = time_fn(fwd, device, args.warmup, args.repeats)
    return [
        _result(
            "forward",
            "parallel_forward",
            {"B": B, "T": T},
            samples,
            device,
            tokens_per_s=B * T / statistics.median(samples),
        )
    ]


def _decode_case(model: SpikeGPT, args, device, B: int, steps: int) -> tuple[list[float], str]:
    """Seconds per step of decoding ``B`` sequences, and the path the steps took (``compiled``, ``cuda-graph``,
    ``modules``: the stepper; ``model.step`` with ``--eager``)."""
    # the ids are drawn in range, so neither path range-checks them per step (on CUDA that is a sync)
    g = torch.Generator().manual_seed(B)
    tokens = iter(torch.randint(0, args.vocab, (steps + args.warmup + 6, B), generator=g).to(device))
    with torch.inference_mode():
        _reset_peak(device)  # before capture, so that the graph's memory pool counts
        if not args.eager:
            stepper = GraphedStepper(model, B, use_graph=args.cuda_graph)
            path = "cuda-graph" if stepper.uses_graph else "compiled" if stepper.uses_compiled_step else "modules"

            def one():
                stepper.step(next(tokens), check_ids=False)

        else:
            path = "model.step"
            state = model.init_state(B)

            def one():
                nonlocal state
                _, state = model.step(next(tokens), state, check_ids=False)

        samples = time_fn(one, device, args.warmup, steps)
        if args.profile and B == 1:
            _profile(one, device, min(steps, 5))
    return samples, path


def linear_flops_per_row(model: nn.Module) -> int:
    """Multiply-adds times two of every linear layer of ``model`` for one row (token) of input."""
    return sum(2 * w.numel() for w in linear_weights(model) if w.dim() == 2)


def time_products(model: nn.Module, device: torch.device, warmup: int, repeats: int, rows: int = 1) -> dict:
    """Milliseconds of ``rows`` rows through every linear layer of ``model`` in model order, with nothing else.

    ``products_ms``: the layers themselves (the product kernel they choose, module calls included);
    ``torch_products_ms``: ``F.linear`` by the same weights (bfloat16 or float32 layers; ``None`` for int8).
    The step's time minus ``products_ms`` is what the step spends outside its linear layers.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | Int8Linear)]
    dtype = model.emb.weight.dtype
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(rows, m.in_features, generator=g).to(device, dtype) for m in layers]
    plain = all(isinstance(m, nn.Linear) for m in layers)
    with torch.inference_mode():
        ours = time_fn(lambda: [m(x) for m, x in zip(layers, inputs, strict=True)], device, warmup, repeats)
        torch_samples = (
            time_fn(
                lambda: [F.linear(x, m.weight) for m, x in zip(layers, inputs, strict=True)], device, warmup, repeats
            )
            if plain
            else None
        )
    return {
        "products_ms": statistics.median(ours) * 1e3,
        "torch_products_ms": None if torch_samples is None else statistics.median(torch_samples) * 1e3,
    }


def time_matmul_rate(dtype: torch.dtype, device: torch.device, warmup: int, repeats: int) -> float:
    """GFLOP/s of one large ``F.linear`` in ``dtype`` (512 x 768 by 768 x 3072, compute-bound): what the
    machine's matrix product reaches in that dtype, measured beside the step it is compared with."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 768, generator=g).to(device, dtype)
    w = torch.randn(3072, 768, generator=g).to(device, dtype)
    with torch.inference_mode():
        med = statistics.median(time_fn(lambda: F.linear(x, w), device, warmup, repeats))
    return 2 * x.shape[0] * w.numel() / med / 1e9


def bench_recurrent(args, device, dtype) -> list[dict]:
    """Token-by-token decoding (weights in ``dtype``, or int8 with ``--int8-weights``; state in float32).

    Each row also carries the time to read all the linear weights once (``weight_read_ms``, the same model
    and dtype) and ``step_over_weight_read``, the step's median time over it; the product kernel the linear
    layers chose for that batch (``kernel``, :func:`~spikegpt_ft.ops.linear.product_kernel` on the CPU) and,
    where that is the streaming kernel reading the weights from memory, how it prefetches them (``prefetch``,
    :func:`~spikegpt_ft.ops.linear.stream_prefetch`);
    the batch's rows through the linear layers alone (:func:`time_products`); and the step's linear-layer rate
    (``linear_gflop_per_s``: their FLOPs over the whole step's time) beside one large matrix product in
    bfloat16 and float32, measured in the same run (``matmul_gflop_per_s``), and beside the rate at which the
    products would take exactly the read time (``read_bound_gflop_per_s``: a step that reads every weight
    once cannot exceed it unless the weights stay in cache).

    Each step goes through :class:`~spikegpt_ft.inference.GraphedStepper`, as decoding does: with
    ``--cuda-graph`` (the default on CUDA) one replay of a CUDA graph of ``model.step``, on the CPU the
    compiled step where the model allows it; ``--eager`` times ``model.step`` itself. Each row records
    which (``step``).
    """
    model = random_model(args, device).eval()
    if args.rec_adapter != "none":  # the update itself (B = 0) is as costly as a trained one
        from ..adapters import attach_adapters

        attach_adapters(model, kind=args.rec_adapter, r=args.rank, gate=args.rec_gate).eval()
    weights = "int8" if args.int8_weights else str(dtype).removeprefix("torch.")
    if weights in WEIGHT_PRECISIONS:
        cast_weights(model, weights)
    else:
        model.to(dtype)
    read = time_weight_read(model, device, args.warmup, max(args.repeats, 5))
    rates = {
        name: time_matmul_rate(d, device, args.warmup, max(args.repeats, 5))
        for name, d in (("bfloat16", torch.bfloat16), ("float32", torch.float32))
    }
    flops = linear_flops_per_row(model)
    weight_dtype = torch.int8 if weights == "int8" else dtype
    results = []
    for B, steps in ((1, args.rec_steps), (args.rec_batch, args.rec_batch_steps)):
        samples, path = _decode_case(model, args, device, B, steps)
        med = statistics.median(samples)
        kernel = product_kernel(B, weight_dtype) if device.type == "cpu" and weights != "float32" else "torch"
        # the streaming kernel prefetches the weights only where they come from memory (up to four rows)
        prefetch = stream_prefetch() if kernel.startswith("stream-") and B <= STREAM_MAX_ROWS else None
        products = time_products(model, device, args.warmup, max(args.repeats, 5), rows=B)
        results.append(
            _result(
                "recurrent",
                f"recurrent_b{B}",
                {"B": B, "steps": steps},
                samples,
                device,
                ms_per_token=med * 1e3 if B == 1 else None,
                tokens_per_s=B / med,
                weights_dtype=weights,
                adapter=args.rec_adapter if args.rec_adapter == "none" else f"{args.rec_adapter} r{args.rank}",
                state_dtype="float32",
                cuda_graph=path == "cuda-graph",
                step=path,
                kernel=kernel,
                prefetch=prefetch,
                **read,
                **products,
                step_over_weight_read=med * 1e3 / read["weight_read_ms"],
                linear_gflop_per_s=flops * B / med / 1e9,
                read_bound_gflop_per_s=flops * B / read["weight_read_ms"] / 1e6,
                matmul_gflop_per_s=rates,
            )
        )
    return results


def _profile(fn: Callable[[], object], device: torch.device, calls: int) -> None:
    """Print where the time of ``calls`` calls goes (torch.profiler, by self time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15))


RUNNERS = {
    "wkv": bench_wkv, "lif": bench_lif, "train": bench_train, "forward": bench_forward, "recurrent": bench_recurrent,
}  # fmt: skip


# --------------------------------------------------------------------------------------------- CLI


def _products_text(r: dict) -> str:
    if "products_ms" not in r:
        return ""
    torch_ms = r["torch_products_ms"]
    return f"{r['products_ms']:.2f}" + ("" if torch_ms is None else f" ({torch_ms:.2f})")


def _read_text(r: dict) -> str:
    if "weight_read_ms" not in r:
        return ""
    prefetch = r.get("weight_read_prefetch")
    return f"{r['weight_read_ms']:.3f}" + (f" ({prefetch})" if prefetch else "")


def _rates_text(r: dict) -> str:
    if "linear_gflop_per_s" not in r:
        return ""
    m, bound = r["matmul_gflop_per_s"], r["read_bound_gflop_per_s"]
    return f"{r['linear_gflop_per_s']:.1f} ({m['bfloat16']:.1f} / {m['float32']:.1f}; {bound:.1f})"


def format_table(results: list[dict]) -> str:
    """A plain-text table of the results."""
    rows = [
        ("section", "case", "shape", "median ms", "min ms", "throughput", "peak MiB", "cpu ms/call", "load",
         "weight read ms", "step/read", "products ms (F.linear)", "step", "kernel",
         "linear GFLOP/s (bf16 / fp32 matmul; read bound)"),
    ]  # fmt: skip
    for r in results:
        shape = "x".join(f"{k}{v}" for k, v in r["shape"].items())
        tput = f"{r['tokens_per_s']:.1f} tok/s" if r.get("tokens_per_s") else ""
        rows.append(
            (
                r["section"],
                r["name"],
                shape,
                f"{r['median_ms']:.2f}",
                f"{r['min_ms']:.2f}",
                tput,
                f"{r['peak_mem_mb']:.0f}",
                f"{r['process_cpu_ms_per_call']:.1f}",
                f"{r['load_average_after']:.2f}" if r["load_average_after"] is not None else "",
                _read_text(r),
                f"{r['step_over_weight_read']:.2f}" if "step_over_weight_read" in r else "",
                _products_text(r),
                r.get("step", ""),
                r.get("kernel", "") + (f" ({r['prefetch']})" if r.get("prefetch") else ""),
                _rates_text(r),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spikegpt-ft bench", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=(*SECTIONS, "all"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="wkv: k/v dtype; train: autocast dtype; forward/recurrent: weight dtype",
    )
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--embd", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50277)
    p.add_argument("--batch", type=int, help="wkv and train batch (default: the issue's shapes; train 32, CPU 4)")
    p.add_argument("--tokens", type=int, help="wkv and train tokens per sequence (default 64 / the issue's shapes)")
    p.add_argument("--repeats", type=int, help="timed repeats per case (default 20 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed calls first (default 5 on CUDA, 1 on CPU)")
    p.add_argument("--rank", type=int, default=16, help="LoRA / SpikeLoRA rank of the train cases")
    p.add_argument(
        "--train-modes", nargs="+", default=["full", "lora", "spikelora"], choices=["full", "lora", "spikelora"]
    )
    p.add_argument("--fwd-batch", type=int, default=1)
    p.add_argument("--fwd-tokens", type=int, default=128)
    p.add_argument("--rec-steps", type=int, help="timed tokens at batch 1 (default 100 CUDA, 20 CPU)")
    p.add_argument("--rec-batch", type=int, help="batched decoding batch (default 256 CUDA, 64 CPU)")
    p.add_argument("--rec-batch-steps", type=int, help="timed steps of the batched case (default 50 CUDA, 5 CPU)")
    p.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        help="recurrent: replay each step as a CUDA graph (default on CUDA; CUDA only)",
    )
    p.add_argument(
        "--rec-adapter",
        choices=["none", "lora", "spikelora"],
        default="none",
        help="recurrent: adapters of rank --rank on every linear layer of the blocks",
    )
    p.add_argument(
        "--rec-gate", choices=["temporal", "pointwise"], default="temporal", help="recurrent: SpikeLoRA gate"
    )
    p.add_argument(
        "--eager",
        action="store_true",
        help="recurrent: time model.step itself instead of the stepper (GraphedStepper) that decoding uses",
    )
    p.add_argument(
        "--int8-weights",
        action="store_true",
        help="recurrent: int8 linear weights with bfloat16 activations (spikegpt_ft.inference.cast_weights; CPU)",
    )
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--profile", action="store_true", help="recurrent: print a torch.profiler table of batch-1 steps")
    return p


def _defaults(args: argparse.Namespace, device: torch.device) -> None:
    cuda = device.type == "cuda"
    pick = lambda value, on_cuda, on_cpu: value if value is not None else (on_cuda if cuda else on_cpu)  # noqa: E731
    args.repeats = pick(args.repeats, 20, 3)
    args.warmup = pick(args.warmup, 5, 1)
    args.train_batch = 32 if cuda else 4
    args.rec_steps = pick(args.rec_steps, 100, 20)
    args.rec_batch = pick(args.rec_batch, 256, 64)
    args.rec_batch_steps = pick(args.rec_batch_steps, 50, 5)
    args.cuda_graph = pick(args.cuda_graph, True, False)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    _defaults(args, device)
    if args.cuda_graph and device.type != "cuda":
        raise SystemExit("--cuda-graph needs --device cuda (a CUDA graph does not exist on the CPU)")
    env = environment(device, dtype, argv)
    env["model_shape"] = {"layers": args.layers, "embd": args.embd, "vocab": args.vocab, "ffn": 4 * args.embd}
    sections = SECTIONS if args.what == "all" else (args.what,)
    results = []
    for section in sections:
        results += RUNNERS[section](args, device, dtype)
    print(
        f"# {env['device_name']} | torch {env['torch']} | cuda {env['cuda']} | threads {env['threads']} "
        f"| dtype {env['dtype']} | model L{args.layers} C{args.embd} V{args.vocab}"
    )
    print(format_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"env": env, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
