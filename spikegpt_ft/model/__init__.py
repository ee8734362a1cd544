"""The SpikeGPT model: architecture (``spikegpt.py``), recurrent state, official checkpoints, sizes and inits."""

from .checkpoint import load_model, read_state_dict, save_official
from .init import PRESETS, SCRATCH_INITS, Preset, init_random_spiking, init_scratch, read_preset
from .spikegpt import (
    BLOCK_DROPOUT,
    VOCAB_SIZE,
    SpikeGPT,
    SpikeGPTConfig,
    check_token_ids,
    fire,
    make_lif,
)
from .state import RecurrentState

__all__ = [
    "BLOCK_DROPOUT",
    "PRESETS",
    "VOCAB_SIZE",
    "Preset",
    "RecurrentState",
    "SpikeGPT",
    "SpikeGPTConfig",
    "check_token_ids",
    "fire",
    "init_random_spiking",
    "init_scratch",
    "SCRATCH_INITS",
    "load_model",
    "make_lif",
    "read_preset",
    "read_state_dict",
    "save_official",
]
