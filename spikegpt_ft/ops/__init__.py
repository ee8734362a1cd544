"""The operators under SpikeGPT, each a compiled kernel behind an autograd Function and one public call.

- :func:`wkv` (``wkv.py``): the time mix's WKV recurrence with an explicit state in and out, on the CPU and
  in CUDA (``csrc/wkv_*``); :func:`fresh_state` makes the state before any token.
- :class:`CompiledLIFNode` (``lif.py``): SpikingJelly's multi-step LIF neuron with a compiled CPU path
  giving bitwise SpikingJelly's spikes, membranes and gradients (``csrc/lif_cpu.cpp``).
- :class:`Linear` and :class:`Int8Linear` (``linear.py``): linear layers whose bfloat16 and int8 inference
  products on the CPU run compiled kernels: streaming the weights for few rows (``csrc/linear_cpu.cpp``), on
  AMX tiles for more bfloat16 rows (``csrc/amx_linear.cpp``).
- :func:`~spikegpt_ft.ops.decode.decode_blocks` (``decode.py``): one recurrent step of a stack of blocks in
  one compiled call, bitwise the modules' result, for CPU decoding (``csrc/decode_cpu.cpp``).
- ``extension.py`` builds the one extension that holds them (ninja, at first use, cached).
"""

from .extension import extension, needs_autograd
from .lif import CompiledLIFNode
from .linear import Int8Linear, Linear
from .wkv import FRESH_EXPONENT, fresh_state, wkv

__all__ = [
    "FRESH_EXPONENT",
    "CompiledLIFNode",
    "Int8Linear",
    "Linear",
    "extension",
    "fresh_state",
    "needs_autograd",
    "wkv",
]
