"""Time the official SpikeGPT recurrent runner (``src/model_run.py``'s ``RWKV_RNN``) beside this project's
stepper, on the same random weights, in one run (the comparison row of BENCHMARKS.md's CPU decoding table).

Usage: ``python scripts/bench_official_recurrent.py --official PATH_TO_SPIKEGPT_CHECKOUT [--dtype bfloat16]``

The weights are ``spikegpt-ft bench``'s (:func:`spikegpt_ft.tools.bench.random_model`, 216M shape by
default), written once in the official format. The official runner is imported from the checkout as it is
(``RWKV_JIT_ON=0``, its vendored SpikingJelly); it is timed one token at a time from its own state, after
the same warm-up as this project's stepper. Printed: ms per token of each, the time to read the linear weights
once, and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import types
from pathlib import Path

import torch

from spikegpt_ft.inference import GraphedStepper, cast_weights
from spikegpt_ft.model import save_official
from spikegpt_ft.tools.bench import random_model, time_fn, time_weight_read

#: The official runner's name for each weight precision.
FLOAT_MODES = {"bfloat16": "bf16", "float32": "fp32"}


def official_runner(checkout: Path, checkpoint: Path, model, float_mode: str):
    """The official ``RWKV_RNN`` on ``checkpoint`` (``.pth``), imported from ``checkout``."""
    os.environ.setdefault("RWKV_JIT_ON", "0")
    sys.path.insert(0, str(checkout))
    from src.model_run import RWKV_RNN  # the official code, run beside ours, not part of this project

    config = model.config
    args = types.SimpleNamespace(
        MODEL_NAME=str(checkpoint.with_suffix("")), FLOAT_MODE=float_mode, RUN_DEVICE="cpu",
        n_layer=config.n_layer, n_embd=config.n_embd, ctx_len=1024, vocab_size=config.vocab_size,
        head_qk=0, pre_ffn=0, grad_cp=0, my_pos_emb=0,
    )  # fmt: skip
    return RWKV_RNN(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="a checkout of ridgerchu/SpikeGPT")
    parser.add_argument("--dtype", choices=sorted(FLOAT_MODES), default="bfloat16")
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--embd", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50277)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    if not (args.official / "src" / "model_run.py").is_file():
        raise SystemExit(f"{args.official} is not a SpikeGPT checkout (no src/model_run.py)")
    cpu = torch.device("cpu")
    model = random_model(args, cpu).eval()
    tokens = torch.randint(0, args.vocab, (args.steps + args.warmup + 4,), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_official(model.state_dict(), Path(tmp) / "model.pth")
        official = official_runner(args.official, checkpoint, model, FLOAT_MODES[args.dtype])
    cast_weights(model, args.dtype)
    read = time_weight_read(model, cpu, args.warmup, 5)
    with torch.inference_mode():
        stepper = GraphedStepper(model, 1)
        ours = iter(tokens)
        ours_ms = statistics.median(time_fn(lambda: stepper.step(next(ours)[None]), cpu, args.warmup, args.steps))
        theirs, state = iter(tokens.tolist()), [None, None, None]

        def official_step():
            state[:] = official.forward([next(theirs)], *state)[1:]

        official_ms = statistics.median(time_fn(official_step, cpu, args.warmup, args.steps))
    read_ms = read["weight_read_ms"]
    print(f"weights {args.dtype}, L{args.layers} C{args.embd} V{args.vocab}, {torch.get_num_threads()} threads")
    print(f"weight read: {read_ms:.1f} ms ({read['weight_bytes'] / 1e6:.0f} MB)")
    print(f"official RWKV_RNN: {official_ms * 1e3:.1f} ms/token ({official_ms * 1e3 / read_ms:.2f} x read)")
    print(f"spikegpt-ft stepper ({'compiled' if stepper.uses_compiled_step else 'modules'}): "
          f"{ours_ms * 1e3:.1f} ms/token ({ours_ms * 1e3 / read_ms:.2f} x read)")  # fmt: skip
    print(f"official / spikegpt-ft: {official_ms / ours_ms:.2f}")


if __name__ == "__main__":
    main()
