"""Lower-precision weights for inference: bfloat16, or int8 weight-only quantisation for CPU decoding.

Decoding reads every weight once per token, so on a CPU it runs at the speed of memory: halving the bytes
of the weights halves the time of a step. In bfloat16 the model's :class:`~spikegpt_ft.ops.Linear` layers
take the compiled product by themselves (:func:`~spikegpt_ft.ops.linear.product_kernel`); ``int8`` swaps them for
:class:`~spikegpt_ft.ops.Int8Linear` (activations stay bfloat16, the recurrent state float32).

The spiking nonlinearities are thresholds, so a small change of a weight can flip a spike: measure the
accuracy of a quantised classifier (``python infer.py --checkpoint RUN --evaluate --weights int8``) before
relying on it. ``BENCHMARKS.md`` has the measured speed and accuracy.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import replace_module
from ..ops import Int8Linear

#: The weight precisions :func:`cast_weights` accepts.
WEIGHT_PRECISIONS = ("float32", "bfloat16", "int8")


def quantize_int8(model: nn.Module) -> list[str]:
    """Replace, in place, every ``nn.Linear`` of ``model`` by an ``Int8Linear``; returns their names.

    In an adapter only the frozen base layer is an ``nn.Linear``; its LoRA matrices stay as they are.
    The model must be on the CPU.
    """
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cpu"}:
        raise ValueError(f"int8 weights are a CPU decoding option; the model is on {sorted(devices)}")
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name in names:
        replace_module(model, name, Int8Linear(model.get_submodule(name)))
    return names


def cast_weights(model: nn.Module, precision: str) -> nn.Module:
    """Put ``model``'s weights in ``precision`` (one of :data:`WEIGHT_PRECISIONS`) for inference, in place.

    ``int8`` means int8 linear layers (see :func:`quantize_int8`) and bfloat16 for everything else.
    """
    if precision not in WEIGHT_PRECISIONS:
        raise ValueError(f"unknown weight precision {precision!r}; choose one of {', '.join(WEIGHT_PRECISIONS)}")
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        raise ValueError("this model's weights are int8 already; load it again to change their precision")
    if precision == "float32":
        return model.float()
    model.to(torch.bfloat16)
    if precision == "int8":
        quantize_int8(model)
    return model
