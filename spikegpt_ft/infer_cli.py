"""``infer.py``: classify texts with a fine-tuned SpikeGPT token by token, or generate text with a base LM.

Classification (the default mode is recurrent: one token at a time through ``model.step``)::

    python infer.py --checkpoint RUN_DIR_OR_ADAPTER [--base BASE.pth] --text "a gripping film"
    python infer.py --checkpoint RUN_DIR --file texts.txt --json          # one JSON object per line
    cat texts.txt | python infer.py --checkpoint RUN_DIR --mode parallel
    python infer.py --checkpoint RUN_DIR --text "..." --stream            # running prediction per token

Generation with a pretrained SpikeGPT language model (prefill, then one ``step`` per new token)::

    python infer.py --base SpikeGPT-216M.pth --generate "The film" --max-tokens 50 --temperature 0.8 --top-p 0.9

Bad input (a missing or wrong checkpoint, no text, ``--generate`` without ``--base``) ends with a one-line
``error:`` message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from . import inference
from .quantize import WEIGHT_PRECISIONS, cast_weights

#: ``<|endoftext|>``: generation stops after it, and an empty prompt starts from it.
EOS_ID = 0


class CLIError(Exception):
    """Bad input: reported as one ``error:`` line and exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infer.py",
        description="Recurrent-mode (token by token) classification with a fine-tuned SpikeGPT, or text "
        "generation with a base SpikeGPT language model.",
    )
    p.add_argument("--checkpoint", help="run directory or adapter file written by train.py (classification)")
    p.add_argument("--base", help="base SpikeGPT .pth: the LM for --generate, or the base a checkpoint builds on")
    src = p.add_argument_group("input (classification); without --text or --file, lines are read from stdin")
    src.add_argument("--text", action="append", help="a text to classify (repeatable)")
    src.add_argument("--file", help="a file with one text per line")
    src.add_argument("--encoding", default="utf-8", help="encoding of --file / stdin lines (default utf-8)")
    p.add_argument("--mode", choices=inference.MODES, default="recurrent", help="default: recurrent")
    p.add_argument("--stream", action="store_true", help="print the running prediction after every token")
    p.add_argument("--json", action="store_true", help="one JSON object per text (or per token with --stream)")
    p.add_argument("--batch-size", type=int, default=inference.DEFAULT_BATCH, help="texts processed together")
    p.add_argument(
        "--chunk-len",
        type=int,
        default=inference.DEFAULT_CHUNK,
        help="tokens per parallel pass (longer texts carry the state)",
    )
    p.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's, else data/ or ../shared/tokenizer/)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--weights",
        choices=WEIGHT_PRECISIONS,
        default="float32",
        help="weight precision: bfloat16, or int8 linear layers (CPU; faster decoding, measure the accuracy "
        "with --evaluate); the recurrent state stays float32 (default float32)",
    )
    ev = p.add_argument_group("evaluation")
    ev.add_argument(
        "--evaluate",
        action="store_true",
        help="evaluate the checkpoint on its task's test split (its seed's split) in recurrent and parallel mode",
    )
    ev.add_argument("--data-dir", help="folder of the task's original files (default: data/<task> or ../shared/data)")
    ev.add_argument("--max-eval-samples", type=int, default=None, help="a stratified subset of the test split")
    gen = p.add_argument_group("generation")
    gen.add_argument("--generate", metavar="PROMPT", help="generate a continuation of PROMPT with the --base LM")
    gen.add_argument("--max-tokens", type=int, default=100)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass, in (0, 1]")
    gen.add_argument("--seed", type=int, default=None)
    return p


def _info(info, key: str, default=None):
    if isinstance(info, Mapping):
        return info.get(key, default)
    return getattr(info, key, default)


def _load_tokenizer(path: str | Path | None):
    """The tokenizer at ``path``, else where training looks for it (``data/``, then ``../shared/tokenizer/``)."""
    from .data import load_tokenizer

    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as err:
        raise CLIError(str(err)) from err


def _device(name: str | None) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: no CUDA device is available")
    return name


def _read_lines(raw: Iterable[bytes], encoding: str) -> tuple[list[tuple[int, str]], int, int]:
    """Non-empty decoded lines with their 1-based numbers, and the counts of empty and undecodable lines."""
    texts, empty, bad = [], 0, 0
    for number, line in enumerate(raw, 1):
        try:
            text = line.decode(encoding).strip()
        except UnicodeDecodeError:
            bad += 1
            continue
        if text:
            texts.append((number, text))
        else:
            empty += 1
    return texts, empty, bad


def _gather_texts(args) -> list[tuple[int, str]]:
    try:
        "".encode(args.encoding)
    except LookupError as err:
        raise CLIError(f"unknown --encoding {args.encoding!r}") from err
    empty = bad = 0
    if args.text:
        texts = [(i, t.strip()) for i, t in enumerate(args.text, 1) if t.strip()]
        empty = len(args.text) - len(texts)
    elif args.file:
        path = Path(args.file)
        if not path.is_file():
            raise CLIError(f"input file not found: {path}")
        with path.open("rb") as f:
            texts, empty, bad = _read_lines(f, args.encoding)
    else:
        if sys.stdin is None or sys.stdin.isatty():
            raise CLIError("no input: give --text, --file, or pipe lines on stdin")
        texts, empty, bad = _read_lines(sys.stdin.buffer, args.encoding)
    if empty or bad:
        print(
            f"skipped {empty + bad} input line(s): {empty} empty, {bad} undecodable as {args.encoding}", file=sys.stderr
        )
    if not texts:
        raise CLIError("no text to classify (every input line was empty or undecodable)")
    return texts


def _load_classifier(args, device: str):
    path = Path(args.checkpoint)
    if not path.exists():
        raise CLIError(f"checkpoint not found: {path}")
    if args.base and not Path(args.base).is_file():
        raise CLIError(f"base model not found: {args.base}")
    from . import checkpoint

    try:
        model, info = checkpoint.load_classifier(path, base=args.base, device=device)
    except Exception as err:  # any failure to load is bad input here, reported in one line
        raise CLIError(f"cannot load a classifier from {path}: {err}") from err
    return _with_weights(model, args.weights).eval(), info


def _with_weights(model, precision: str):
    try:
        return cast_weights(model, precision)
    except ValueError as err:  # int8 on a GPU
        raise CLIError(f"--weights {precision}: {err}") from err


def _encode(tokenizer, texts: list[tuple[int, str]], vocab_size: int) -> tuple[list[tuple[int, str]], list[list[int]]]:
    kept, ids_list, skipped = [], [], 0
    for number, text in texts:
        ids = tokenizer.encode(text).ids
        if not ids:
            skipped += 1
            continue
        if max(ids) >= vocab_size:
            raise CLIError(
                f"line {number}: token id {max(ids)} is outside the vocabulary ({vocab_size}); wrong --tokenizer?"
            )
        kept.append((number, text))
        ids_list.append(ids)
    if skipped:
        print(f"skipped {skipped} input line(s) that gave no tokens", file=sys.stderr)
    if not kept:
        raise CLIError("no text to classify (no line gave any token)")
    return kept, ids_list


def _format_probs(labels: list[str], probs: torch.Tensor) -> dict[str, float]:
    return {label: round(float(p), 6) for label, p in zip(labels, probs, strict=True)}


def _classify(args) -> None:
    device = _device(args.device)
    if args.batch_size < 1 or args.chunk_len < 1:
        raise CLIError("--batch-size and --chunk-len must be positive")
    model, info = _load_classifier(args, device)
    texts = _gather_texts(args)
    n_out = model.config.head_out
    labels = [str(x) for x in (_info(info, "labels") or range(n_out))]
    if len(labels) != n_out:
        raise CLIError(f"the checkpoint names {len(labels)} labels but its head has {n_out} outputs")
    tokenizer = _load_tokenizer(args.tokenizer or _info(info, "tokenizer"))
    texts, ids_list = _encode(tokenizer, texts, model.config.vocab_size)

    if args.stream:
        for (number, _text), ids in zip(texts, ids_list, strict=True):
            for t, probs in enumerate(inference.stream(model, ids)):
                label = labels[int(probs.argmax())]
                token = tokenizer.decode([ids[t]])
                if args.json:
                    row = {"line": number, "token_index": t, "token": token, "label": label}
                    print(json.dumps({**row, "probs": _format_probs(labels, probs), "mode": "recurrent"}))
                else:
                    print(f"{number}:{t}\t{token!r}\t{label}\t{_probs_text(labels, probs)}")
        return

    all_probs = inference.classify(model, ids_list, args.mode, args.batch_size, args.chunk_len)
    for (number, text), probs in zip(texts, all_probs, strict=True):
        label = labels[int(probs.argmax())]
        if args.json:
            print(
                json.dumps({"line": number, "label": label, "probs": _format_probs(labels, probs), "mode": args.mode})
            )
        else:
            snippet = text if len(text) <= 60 else text[:57] + "..."
            print(f"{label}\t{_probs_text(labels, probs)}\t{snippet}")


def _probs_text(labels: list[str], probs: torch.Tensor) -> str:
    return " ".join(f"{label}={float(p):.4f}" for label, p in zip(labels, probs, strict=True))


#: Recurrent and parallel predictions must agree on at least this fraction of a test split.
MIN_AGREEMENT = 0.999


def _evaluate(args) -> None:
    """Accuracy on the checkpoint's test split in both modes, and how often the two modes agree."""
    device = _device(args.device)
    model, info = _load_classifier(args, device)
    if not _info(info, "task"):
        raise CLIError("the checkpoint names no task; --evaluate needs a checkpoint written by train.py")
    from .data import build_splits

    seed = _info(info, "seed") or 0
    try:
        splits, _ = build_splits(
            info["task"],
            seed,
            args.data_dir or _info(info, "data_dir"),
            test_fraction=_info(info, "test_fraction", 0.1),
            val_fraction=_info(info, "val_fraction", 0.1),
            max_eval_samples=args.max_eval_samples,
        )
    except (OSError, ValueError) as err:
        raise CLIError(str(err)) from err
    test = splits["test"]
    tokenizer = _load_tokenizer(args.tokenizer or _info(info, "tokenizer"))
    ids_list = [e.ids for e in tokenizer.encode_batch(test["text"])]
    results = {
        mode: inference.evaluate(model, ids_list, test["label"], mode, args.batch_size, args.chunk_len)
        for mode in inference.MODES
    }
    agree = inference.agreement(results["recurrent"], results["parallel"])
    summary = {
        "task": info["task"],
        "seed": seed,
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
            f"{info['task']} test split (seed {seed}, {len(ids_list)} texts, up to {summary['longest_tokens']} tokens, "
            f"none truncated; {args.weights} weights)\n"
            f"  recurrent accuracy {100 * summary['recurrent_accuracy']:.2f} %\n"
            f"  parallel accuracy  {100 * summary['parallel_accuracy']:.2f} %\n"
            f"  same prediction    {100 * agree:.2f} % of texts"
        )
    if agree < MIN_AGREEMENT:
        print(f"error: recurrent and parallel mode agree on only {100 * agree:.2f} % (< 99.9 %)", file=sys.stderr)
        raise SystemExit(1)


def _generate(args) -> None:
    if args.checkpoint:
        raise CLIError("--generate runs a base language model (--base), not a classifier --checkpoint")
    if not args.base:
        raise CLIError("--generate needs --base PATH, a pretrained SpikeGPT language model (.pth)")
    if args.max_tokens < 0:
        raise CLIError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    if args.temperature < 0:
        raise CLIError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise CLIError(f"--top-p must be in (0, 1], got {args.top_p}")
    base = Path(args.base)
    if not base.is_file():
        raise CLIError(f"base model not found: {base}")
    device = _device(args.device)
    tokenizer = _load_tokenizer(args.tokenizer)
    from .model import load_model

    try:
        model = load_model(base, device=device)
    except (OSError, ValueError) as err:
        raise CLIError(str(err)) from err
    model = _with_weights(model, args.weights)
    prompt_ids = tokenizer.encode(args.generate).ids or [EOS_ID]
    if max(prompt_ids) >= model.config.vocab_size:
        raise CLIError(f"the prompt has token id {max(prompt_ids)}, outside the model's vocabulary; wrong --tokenizer?")
    generator = None
    if args.seed is not None:
        torch.manual_seed(args.seed)
        generator = torch.Generator().manual_seed(args.seed)
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


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns 0, or exits with status 2 and an ``error:`` line on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.generate is not None:
            _generate(args)
        elif args.evaluate:
            if not args.checkpoint:
                raise CLIError("--evaluate needs --checkpoint RUN_OR_ADAPTER")
            _evaluate(args)
        elif args.checkpoint:
            _classify(args)
        else:
            raise CLIError("give --checkpoint RUN_OR_ADAPTER to classify, or --base PATH --generate PROMPT to generate")
    except CLIError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except BrokenPipeError:  # e.g. piped into head
        sys.stderr.close()
    return 0
