"""spikegpt-ft: fine-tune the spiking language model SpikeGPT fully or with LoRA / SpikeLoRA adapters."""

from .model import SpikeGPT, SpikeGPTConfig, load_model
from .state import RecurrentState

__all__ = ["RecurrentState", "SpikeGPT", "SpikeGPTConfig", "load_model"]
