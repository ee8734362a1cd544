"""``infer.py`` / ``spikegpt-ft infer``: classify texts token by token, evaluate a run, or generate text.

Classification (the default mode is recurrent: one token at a time through ``model.step``)::

    python infer.py --checkpoint RUN_DIR [--base BASE.pth] --text "a gripping film"
    python infer.py --checkpoint RUN_DIR --file texts.txt --json          # one JSON object per line
    cat texts.txt | python infer.py --checkpoint RUN_DIR --mode parallel
    python infer.py --checkpoint RUN_DIR --text "..." --stream            # running prediction per token
    python infer.py --checkpoint RUN_DIR --evaluate                       # its own test split, both modes

Generation with a language model (an official-format ``.pth`` or a ``--task lm`` run)::

    python infer.py --base SpikeGPT-216M.pth --generate "The film" --max-tokens 50 --temperature 0.8
    python infer.py --checkpoint runs/lm-spikelora-seed0 --generate "It was"

Bad input ends with one ``infer.py: error:`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .. import inference
from ..data import EOS_ID, decode_lines, load_tokenizer
from ..data.reading import split_lines
from ..inference import evaluation
from ..model import SpikeGPT, load_model
from ..runs import RunConfig, load_run
from .common import USAGE_ERROR, quiet_libraries, run_guarded, underscore_flags

PROG = "infer.py"
#: Recurrent and parallel predictions must agree on at least this fraction of a test split.
MIN_AGREEMENT = 0.999
#: Relative difference allowed between the recurrent and parallel perplexity of a language model.
MAX_PERPLEXITY_GAP = 1e-4


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``infer.py``."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Token-by-token classification with a fine-tuned SpikeGPT, evaluation of a run on its own "
        "test split, or text generation with a SpikeGPT language model. Flags accept - or _.",
    )
    p.add_argument("--checkpoint", help="a run directory written by train.py, or its weight file")
    p.add_argument("--base", help="base SpikeGPT .pth: the LM for --generate, or the base an adapter run builds on")
    src = p.add_argument_group("input (classification); without --text or --file, lines are read from stdin")
    src.add_argument("--text", action="append", help="a text to classify (repeatable)")
    src.add_argument("--file", help="a file with one text per line")
    src.add_argument("--encoding", default="utf-8", help="encoding of --file / stdin lines (default utf-8)")
    p.add_argument(
        "--mode",
        choices=inference.MODES,
        default="recurrent",
        help="recurrent (default): one model.step per token, the deployment view, whose cost grows with every "
        "token of a text (a 20k-token text takes minutes on a CPU); parallel: the same answer, in chunks",
    )
    p.add_argument("--stream", action="store_true", help="print the running prediction after every token")
    p.add_argument("--json", action="store_true", help="one JSON object per text (or per token with --stream)")
    p.add_argument("--batch_size", type=_positive_int, default=inference.DEFAULT_BATCH, help="texts together")
    p.add_argument("--chunk_len", type=_positive_int, default=inference.DEFAULT_CHUNK, help="tokens per parallel pass")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the run's, else data/ or ../shared/tokenizer/)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--weights",
        choices=inference.WEIGHT_PRECISIONS,
        default="float32",
        help="weight precision: bfloat16, or int8 linear layers (CPU); the recurrent state stays float32",
    )
    ev = p.add_argument_group("evaluation")
    ev.add_argument("--evaluate", action="store_true", help="score the run on its own test split in both modes")
    ev.add_argument("--data_dir", help="the task's files, when they are no longer where the run found them")
    ev.add_argument("--max_eval_samples", type=_positive_int, default=None, help="a subset of the test split")
    gen = p.add_argument_group("generation")
    gen.add_argument("--generate", metavar="PROMPT", help="generate a continuation of PROMPT")
    gen.add_argument("--max_tokens", type=int, default=100)
    gen.add_argument("--temperature", type=_finite_float, default=1.0, help="0 = greedy")
    gen.add_argument("--top_p", type=_finite_float, default=0.9, help="nucleus sampling mass, in (0, 1]")
    gen.add_argument("--seed", type=int, default=None)
    return p


def _device(name: str | None) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available")
    return name


def _load(args, device: str) -> tuple[SpikeGPT, RunConfig]:
    if args.base and not Path(args.base).is_file():
        raise FileNotFoundError(f"base model not found: {args.base}")
    model, config = load_run(args.checkpoint, base=args.base, device=device)
    return inference.cast_weights(model, args.weights).eval(), config


def _gather_texts(args) -> list[tuple[int, str]]:
    try:
        "".encode(args.encoding)
    except LookupError as err:
        raise ValueError(f"unknown --encoding {args.encoding!r}") from err
    empty = bad = 0
    if args.text:
        texts = [(i, t.strip()) for i, t in enumerate(args.text, 1) if t.strip()]
        empty = len(args.text) - len(texts)
    else:
        raw: Iterable[bytes]
        if args.file:
            path = Path(args.file)
            if not path.is_file():
                raise FileNotFoundError(f"input file not found: {path}")
            raw = split_lines(path.read_bytes())
        elif sys.stdin is None or sys.stdin.isatty():
            raise ValueError("no input: give --text, --file, or pipe lines on stdin")
        else:
            raw = split_lines(sys.stdin.buffer.read())
        texts, empty, bad = decode_lines(raw, args.encoding)
    if empty or bad:
        print(
            f"skipped {empty + bad} input line(s): {empty} empty, {bad} undecodable as {args.encoding}", file=sys.stderr
        )
    if not texts:
        raise ValueError("no text to classify (every input line was empty or undecodable)")
    return texts


def _encode(tokenizer, texts: list[tuple[int, str]], vocab_size: int) -> tuple[list[tuple[int, str]], list[list[int]]]:
    kept, ids_list = [], []
    for number, text in texts:
        ids = tokenizer.encode(text).ids
        if ids and max(ids) >= vocab_size:
            raise ValueError(
                f"line {number}: token id {max(ids)} is outside the vocabulary ({vocab_size}); wrong --tokenizer?"
            )
        if ids:
            kept.append((number, text))
            ids_list.append(ids)
    if len(kept) < len(texts):
        print(f"skipped {len(texts) - len(kept)} input line(s) that gave no tokens", file=sys.stderr)
    if not kept:
        raise ValueError("no text to classify (no line gave any token)")
    return kept, ids_list


def _probs(labels: Sequence[str], probs: torch.Tensor) -> dict[str, float]:
    return {label: round(float(p), 6) for label, p in zip(labels, probs, strict=True)}


def _probs_text(labels: Sequence[str], probs: torch.Tensor) -> str:
    return " ".join(f"{label}={float(p):.4f}" for label, p in zip(labels, probs, strict=True))


def _classifier(args) -> tuple[SpikeGPT, RunConfig, list[str]]:
    model, config = _load(args, _device(args.device))
    if config.is_lm:
        raise ValueError(f"{args.checkpoint} is a language-model run: use --generate or --evaluate with it")
    labels = list(config.labels)
    if len(labels) != model.config.head_out:
        raise ValueError(
            f"{args.checkpoint} names {len(labels)} labels but its head has {model.config.head_out} outputs"
        )
    return model, config, labels


def classify_texts(args) -> None:
    """Print the prediction of every input text (or its running prediction per token with ``--stream``)."""
    model, config, labels = _classifier(args)
    texts = _gather_texts(args)
    tokenizer = load_tokenizer(config.tokenizer_path(args.tokenizer))
    texts, ids_list = _encode(tokenizer, texts, model.config.vocab_size)
    if args.stream:
        for (number, _), ids in zip(texts, ids_list, strict=True):
            for t, probs in enumerate(inference.stream(model, ids)):
                label, token = labels[int(probs.argmax())], tokenizer.decode([ids[t]])
                if args.json:
                    row = {"line": number, "token_index": t, "token": token, "label": label}
                    print(json.dumps(row | {"probs": _probs(labels, probs), "mode": "recurrent"}))
                else:
                    print(f"{number}:{t}\t{token!r}\t{label}\t{_probs_text(labels, probs)}")
        return
    all_probs = inference.classify(model, ids_list, args.mode, args.batch_size, args.chunk_len)
    for (number, text), probs in zip(texts, all_probs, strict=True):
        label = labels[int(probs.argmax())]
        if args.json:
            print(json.dumps({"line": number, "label": label, "probs": _probs(labels, probs), "mode": args.mode}))
        else:
            snippet = text if len(text) <= 60 else text[:57] + "..."
            print(f"{label}\t{_probs_text(labels, probs)}\t{snippet}")


def evaluate_classifier(args, model: SpikeGPT, config: RunConfig) -> int:
    """Accuracy on the run's own test split in both modes, and how often the two modes agree."""
    texts, labels = evaluation.test_split(config, str(args.checkpoint), args.data_dir, args.max_eval_samples)
    tokenizer = load_tokenizer(config.tokenizer_path(args.tokenizer))
    ids_list = [e.ids for e in tokenizer.encode_batch(texts)]
    results = {
        mode: inference.evaluate(model, ids_list, labels, mode, args.batch_size, args.chunk_len)
        for mode in inference.MODES
    }
    agree = inference.agreement(results["recurrent"], results["parallel"])
    summary = {
        "task": config.task,
        "seed": config.seed,
        "split": "test",
        "weights": args.weights,
        "n": len(ids_list),
        "recurrent_accuracy": results["recurrent"].accuracy,
        "parallel_accuracy": results["parallel"].accuracy,
        "agreement": agree,
        "longest_tokens": max(map(len, ids_list)),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"{config.task} test split (seed {config.seed}, {len(ids_list)} texts, up to {summary['longest_tokens']} "
            f"tokens, none truncated; {args.weights} weights)\n"
            f"  recurrent accuracy {100 * summary['recurrent_accuracy']:.2f} %\n"
            f"  parallel accuracy  {100 * summary['parallel_accuracy']:.2f} %\n"
            f"  same prediction    {100 * agree:.2f} % of texts"
        )
    if agree < MIN_AGREEMENT:
        print(f"{PROG}: recurrent and parallel mode agree on only {100 * agree:.2f} % (< 99.9 %)", file=sys.stderr)
        return 1
    return 0


def evaluate_language_model(args, model: SpikeGPT, config: RunConfig) -> int:
    """Loss, perplexity and bits per byte on the run's own test split, in parallel and recurrent mode."""
    windows = evaluation.lm_test_windows(config, str(args.checkpoint), args.max_eval_samples)
    byte_lengths = evaluation.lm_byte_lengths(config, model, args.tokenizer)
    results = {m: evaluation.perplexity(model, windows, byte_lengths, m, args.batch_size) for m in inference.MODES}
    gap = abs(results["recurrent"].ppl - results["parallel"].ppl) / results["parallel"].ppl
    summary = {"task": "lm", "seed": config.seed, "split": "test", "weights": args.weights, "windows": len(windows)}
    for mode, r in results.items():
        summary |= {f"{mode}_loss": r.loss, f"{mode}_ppl": r.ppl, f"{mode}_bpb": r.bpb, "tokens": r.tokens}
    summary["relative_ppl_gap"] = gap
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"language-model test split (seed {config.seed}, {len(windows)} windows, {summary['tokens']} tokens)")
        for mode, r in results.items():
            print(f"  {mode:<9} loss {r.loss:.5f}  perplexity {r.ppl:.4f}  {r.bpb:.5f} bits/byte")
        print(f"  relative perplexity gap {gap:.2e}")
    if gap > MAX_PERPLEXITY_GAP:
        print(
            f"{PROG}: recurrent and parallel perplexity differ by {gap:.2e} (> {MAX_PERPLEXITY_GAP})", file=sys.stderr
        )
        return 1
    return 0


def generate_text(args) -> None:
    """Continue ``--generate``'s prompt with a language model, printing the text as it comes."""
    if args.max_tokens < 0:
        raise ValueError(f"--max_tokens must be >= 0, got {args.max_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1], got {args.top_p}")
    device = _device(args.device)
    if args.checkpoint:
        model, config = _load(args, device)
        if not config.is_lm:
            raise ValueError(f"{args.checkpoint} is a classifier; --generate needs a language model (a --task lm run)")
        tokenizer = load_tokenizer(config.tokenizer_path(args.tokenizer))
    elif args.base:
        if not Path(args.base).is_file():
            raise FileNotFoundError(f"base model not found: {args.base}")
        model = inference.cast_weights(load_model(args.base, device=device), args.weights).eval()
        tokenizer = load_tokenizer(args.tokenizer)
    else:
        raise ValueError("--generate needs a language model: --base PATH.pth or --checkpoint LM_RUN")
    prompt_ids = tokenizer.encode(args.generate).ids or [EOS_ID]
    if max(prompt_ids) >= model.config.vocab_size:
        raise ValueError(
            f"the prompt has token id {max(prompt_ids)}, outside the model's vocabulary; wrong --tokenizer?"
        )
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    sys.stdout.write(args.generate)
    sys.stdout.flush()
    tokens: list[int] = []
    shown = ""
    for token in inference.iter_generate(
        model, prompt_ids, args.max_tokens, args.temperature, args.top_p, generator, (EOS_ID,), args.chunk_len
    ):
        if token == EOS_ID:
            break
        tokens.append(token)
        text = tokenizer.decode(tokens)  # decoded whole, so multi-token characters come out right
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown) :])
            sys.stdout.flush()
            shown = text
    sys.stdout.write(tokenizer.decode(tokens)[len(shown) :] + "\n")


def _run(args) -> int:
    if args.generate is not None:
        generate_text(args)
        return 0
    if not args.checkpoint:
        raise ValueError("give --checkpoint RUN to classify or --evaluate, or --base PATH --generate PROMPT")
    if args.evaluate:
        model, config = _load(args, _device(args.device))
        return (evaluate_language_model if config.is_lm else evaluate_classifier)(args, model, config)
    classify_texts(args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``infer.py``; returns the exit status (2 for bad input)."""
    argv = underscore_flags(list(sys.argv[1:] if argv is None else argv))
    quiet_libraries()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        return USAGE_ERROR if exit_.code else 0
    try:
        return run_guarded(PROG, lambda: _run(args))
    except BrokenPipeError:  # e.g. piped into head
        sys.stderr.close()
        return 0
