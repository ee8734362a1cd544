"""The LIF neuron: SpikingJelly's multi-step ``LIFNode`` with a compiled CPU path.

Why hand-written: SpikingJelly 2.0 has fused CUDA/Triton kernels for the LIF neuron, but on the CPU it
runs a Python loop over the time steps, several small torch ops per step, and its backward is torch's
autograd over that loop. SpikeGPT has two LIF layers per block plus one per SpikeLoRA adapter, so on the
CPU the loop makes SpikeLoRA training much slower than LoRA, and in recurrent decoding (one time step
per call) its per-call overhead is paid by every layer at every token. ``csrc/lif_cpu.cpp`` runs a
whole sequence in one call, forward and backward, in parallel over the channels.

What :class:`CompiledLIFNode` guarantees:

* It is a SpikingJelly ``LIFNode`` (same constructor, step modes, ``.v``, ``.reset()``, forward hooks,
  monitors). Only its multi-step forward on a CPU float32 input changes, and only with the settings the
  kernel implements (SpikeGPT's): ATan surrogate, ``decay_input=True``, hard reset (``v_reset`` not
  None), ``detach_reset=False``, ``store_v_seq=False`` and no explicit neuron precision. Everything else
  (CUDA, where SpikingJelly's own kernels run; other dtypes; other settings; single-step mode) is
  SpikingJelly's code, unchanged.
* The spikes and the membrane left in ``.v`` are bitwise those of SpikingJelly's CPU path: the kernel
  does the same float32 operations in the same order. The membrane the call starts from is
  materialised by SpikingJelly's own ``materialize_states`` (``v_reset`` after a reset).
* The gradients with respect to the input and to the starting membrane (when ``.v`` was given a tensor
  that requires grad) follow the graph torch's autograd builds over SpikingJelly's loop, including a
  gradient reaching the final membrane ``.v``. They are first order only: a backward with
  ``create_graph=True`` through the neuron raises rather than silently dropping the second-order terms.
"""

from __future__ import annotations

import math

import torch
from spikingjelly.activation_based import neuron, surrogate

from .extension import extension, needs_autograd


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _kernel_input(x_seq: object) -> bool:
    """Whether ``x_seq`` is an input the kernel takes: a non-empty strided CPU float32 tensor ``[T, ...]``."""
    return (
        isinstance(x_seq, torch.Tensor)
        and x_seq.dtype == torch.float32
        and x_seq.device.type == "cpu"
        and x_seq.layout == torch.strided
        and x_seq.dim() >= 2
        and x_seq.numel() > 0
    )


def lif_kernel_settings(node: neuron.LIFNode) -> tuple[float, float, float] | None:
    """``(tau, v_threshold, v_reset)`` of a SpikingJelly ``LIFNode`` with the kernel's settings, else ``None``.

    The kernel's arithmetic is SpikingJelly's for these settings in either step mode (one step from ``v_reset``
    is the single-step neuron after a reset).
    """
    sg = node.surrogate_function
    if (
        type(sg) is surrogate.ATan
        and sg.spiking
        and _is_finite_number(sg.alpha)
        and sg.alpha > 0
        and node.decay_input is True
        and node.detach_reset is False
        and not node.store_v_seq
        and node._neuron_precision is None
        and _is_finite_number(node.tau)
        and node.tau > 1
        and _is_finite_number(node.v_threshold)
        and _is_finite_number(node.v_reset)  # None (soft reset) is not a number
    ):
        return float(node.tau), float(node.v_threshold), float(node.v_reset)
    return None


class _LIFFunction(torch.autograd.Function):
    """The compiled kernels as an autograd Function: ``(x [T, *S], v0 [*S]) -> (spikes [T, *S], v_last [*S])``."""

    @staticmethod
    def forward(ctx, x, v0, tau, v_threshold, v_reset, alpha):  # noqa: D102 - autograd protocol
        spikes, v_last, h = extension().lif_forward(x, v0, tau, v_threshold, v_reset)
        ctx.save_for_backward(h)
        ctx.neuron = (tau, v_threshold, v_reset, alpha)
        return spikes, v_last

    @staticmethod
    def backward(ctx, grad_spikes, grad_v_last):  # noqa: D102 - autograd protocol
        if torch.is_grad_enabled():  # a backward with create_graph=True: it would silently drop 2nd-order terms
            raise RuntimeError(
                "the compiled LIF neuron's backward is first order only (create_graph=True reached it); "
                "use spikingjelly's LIFNode for higher-order gradients"
            )
        (h,) = ctx.saved_tensors
        grad_x, grad_v0 = extension().lif_backward(grad_spikes, grad_v_last, h, *ctx.neuron)
        return grad_x, grad_v0, None, None, None, None


class CompiledLIFNode(neuron.LIFNode):
    """SpikingJelly's ``LIFNode`` whose multi-step forward on CPU float32 input runs the compiled kernel.

    Construct it exactly as ``spikingjelly.activation_based.neuron.LIFNode``; see the module docstring
    for when the kernel is used and what it guarantees.
    """

    def kernel_settings(self) -> tuple[float, float, float] | None:
        """``(tau, v_threshold, v_reset)`` where this neuron's settings are the kernel's, else ``None``."""
        return lif_kernel_settings(self)

    def uses_kernel(self, x_seq: torch.Tensor) -> bool:
        """Whether a multi-step forward of ``x_seq`` ``[T, ...]`` runs the compiled kernel (else SpikingJelly)."""
        return _kernel_input(x_seq) and self.kernel_settings() is not None

    def multi_step_forward(self, x_seq: torch.Tensor, *args: torch.Tensor, **kwargs: object) -> torch.Tensor:
        """Spikes ``[T, ...]`` for ``x_seq`` ``[T, ...]`` from the membrane ``self.v``; ``.v`` becomes the last one."""
        settings = None if args or kwargs or not _kernel_input(x_seq) else self.kernel_settings()
        if settings is None:
            return super().multi_step_forward(x_seq, *args, **kwargs)
        v0 = self.materialize_states((x_seq,), tuple(self._memories.values()), "m")[0]
        if needs_autograd(x_seq, v0):
            spikes, v_last = _LIFFunction.apply(x_seq, v0, *settings, float(self.surrogate_function.alpha))
        else:
            spikes, v_last, _ = extension().lif_forward(x_seq, v0, *settings)
        self._memories["v"] = v_last
        self.v_seq = None
        return spikes
