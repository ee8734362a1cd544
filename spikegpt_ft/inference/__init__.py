"""Inference: classification (recurrent or parallel), streaming, generation, lower-precision weights.

- ``stepping.py``: one token at a time or a text in chunks, carrying the recurrent state;
  ``decoding.py``: the same step captured as a CUDA graph.
- ``classify.py``: class logits, predictions, accuracy; ``generate.py``: sampling text.
- ``precision.py``: bfloat16 and int8 weights; ``evaluation.py``: a trained run on its own test split.
"""

from .classify import DEFAULT_BATCH, MODES, Evaluation, agreement, class_logits, classify, evaluate, stream
from .decoding import GraphedStepper
from .generate import generate, iter_generate, nucleus, sample_next
from .precision import WEIGHT_PRECISIONS, cast_weights, quantize_int8
from .stepping import DEFAULT_CHUNK, prefill

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_CHUNK",
    "MODES",
    "WEIGHT_PRECISIONS",
    "Evaluation",
    "GraphedStepper",
    "agreement",
    "cast_weights",
    "class_logits",
    "classify",
    "evaluate",
    "generate",
    "iter_generate",
    "nucleus",
    "prefill",
    "quantize_int8",
    "sample_next",
    "stream",
]
