"""spikegpt-ft: fine-tune the spiking language model SpikeGPT fully or with LoRA / SpikeLoRA adapters."""

import logging

# SpikingJelly registers its LIF operators with torch.library, which logs "Triton not available" in every
# process on a machine without Triton (every CPU-only install); it asks nothing of the user, so it is muted.
logging.getLogger("torch._library.triton").setLevel(logging.ERROR)

from .model import SpikeGPT, SpikeGPTConfig, load_model  # noqa: E402
from .state import RecurrentState  # noqa: E402

__all__ = ["RecurrentState", "SpikeGPT", "SpikeGPTConfig", "load_model"]
