"""Token-count baselines for a language-model run: what a unigram and a bigram count model score on its test split.

Usage: ``python scripts/count_baselines.py RUN_DIR [--bigram-weight W]``

Rebuilds the run's splits exactly as training made them (``TextDataModule`` with the run's texts, seed and
fractions; the split fingerprints are checked against ``run_config.json``) and scores the test split's targets
(every token of its stream but the first: the LM run's targets) with

- add-one unigram counts of the training split over the model's vocabulary, and
- bigram counts of the training split interpolated with that unigram: ``w c(u, v) / c(u) + (1 - w) p(v)``
  (the unigram alone after a token the training split never shows), the weight ``w`` chosen on the
  validation split among 0.1, 0.2, ..., 0.9 unless given.

Prints the perplexity of each beside the run's own test perplexity (RESULTS.md, "The base").
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

from spikegpt_ft.data import EOS_ID, TextDataModule, load_tokenizer


def token_stream(module: TextDataModule, split: str) -> list[int]:
    """The split's tokens as the run packs them: each document's ids followed by the end-of-text id."""
    tokenizer = load_tokenizer(module.tokenizer_path)
    return [t for e in tokenizer.encode_batch(module.documents[split]) for t in (*e.ids, EOS_ID)]


def perplexities(train: list[int], test: list[int], vocab: int, bigram_weight: float) -> dict[str, float]:
    """Perplexity of ``test[1:]`` under the unigram and the interpolated bigram counts of ``train``."""
    unigram, bigram = Counter(train), Counter(zip(train, train[1:], strict=False))
    previous = Counter(train[:-1])
    total = len(train)

    def p_unigram(v: int) -> float:
        return (unigram[v] + 1) / (total + vocab)

    nll_uni = nll_bi = 0.0
    for u, v in zip(test, test[1:], strict=False):
        p = p_unigram(v)
        nll_uni -= math.log(p)
        if previous[u]:
            p = bigram_weight * bigram[(u, v)] / previous[u] + (1 - bigram_weight) * p
        nll_bi -= math.log(p)
    n = len(test) - 1
    return {"unigram": math.exp(nll_uni / n), "bigram": math.exp(nll_bi / n), "targets": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--bigram-weight", type=float, help="default: the best on the validation split")
    args = parser.parse_args()
    config = json.loads((args.run_dir / "run_config.json").read_text())
    if config.get("task") != "lm":
        raise SystemExit(f"{args.run_dir} is not a language-model run (task {config.get('task')!r})")
    data = config["data"]
    module = TextDataModule(
        text=data["text"], text_unit=data["text_unit"], encoding=data["encoding"],
        context_length=data["context_length"], seed=config["seed"], tokenizer=config["tokenizer"],
        val_fraction=data["val_fraction"], test_fraction=data["test_fraction"],
    )  # fmt: skip
    module.setup()
    if module.fingerprints() != config["split_fingerprints"]:
        raise SystemExit("the texts no longer give the run's splits (fingerprints differ): the corpus has changed")
    train, vocab = token_stream(module, "train"), config["model_config"]["vocab_size"]
    weight = args.bigram_weight
    if weight is None:
        validation = token_stream(module, "validation")
        weight = min((w / 10 for w in range(1, 10)), key=lambda w: perplexities(train, validation, vocab, w)["bigram"])
    result = perplexities(train, token_stream(module, "test"), vocab, weight)
    metrics = json.loads((args.run_dir / "metrics.json").read_text())
    print(f"test targets: {result['targets']}")
    print(f"add-one unigram counts: perplexity {result['unigram']:.1f}")
    print(f"bigram counts, weight {weight:.1f} with the unigram: perplexity {result['bigram']:.1f}")
    print(f"the run: test perplexity {metrics['test_ppl']:.1f}")


if __name__ == "__main__":
    main()
