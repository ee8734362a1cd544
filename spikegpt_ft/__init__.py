"""spikegpt-ft: fine-tune the spiking language model SpikeGPT fully or with LoRA / SpikeLoRA adapters.

The layers, each importing only those before it: ``ops`` (kernels) -> ``model`` -> ``adapters`` and ``data``
-> ``runs`` -> ``training`` and ``inference`` -> ``tools`` -> ``cli``. The names below are the public API.
"""

import logging

# SpikingJelly registers its LIF operators with torch.library, which logs "Triton not available" in every
# process on a machine without Triton (every CPU-only install); it asks nothing of the user, so it is muted.
logging.getLogger("torch._library.triton").setLevel(logging.ERROR)

from .adapters import (  # noqa: E402
    AdapterConfig,
    AdapterLinear,
    SparsityMeter,
    attach_adapters,
    load_adapters,
    merge_adapters,
    save_adapters,
    unmerge_adapters,
)
from .model import RecurrentState, SpikeGPT, SpikeGPTConfig, load_model  # noqa: E402
from .ops import fresh_state, wkv  # noqa: E402
from .runs import RunConfig, load_run  # noqa: E402

__all__ = [
    "AdapterConfig",
    "AdapterLinear",
    "RecurrentState",
    "RunConfig",
    "SparsityMeter",
    "SpikeGPT",
    "SpikeGPTConfig",
    "attach_adapters",
    "fresh_state",
    "load_adapters",
    "load_model",
    "load_run",
    "merge_adapters",
    "save_adapters",
    "unmerge_adapters",
    "wkv",
]
