"""LoRA and SpikeLoRA adapters for SpikeGPT, laid out as PEFT's LoRA tuner is.

- ``config.py``: :class:`AdapterConfig` (kind, rank, alpha, scaling, SpikeLoRA's threshold and gate mode).
- ``layer.py``: :class:`AdapterLinear`, the adapted layer (``base``, ``lora_A``, ``lora_B``, ``scaling``).
- ``inject.py``: :func:`attach_adapters`, merging, parameter counts.
- ``sparsity.py``: :class:`SparsityMeter`, the fraction of zeros of SpikeLoRA's gated activations.
- ``saving.py``: adapter files tied to their base by a fingerprint.
"""

from .config import DEFAULT_TARGETS, GATES, KINDS, AdapterConfig
from .inject import (
    adapter_modules,
    attach,
    attach_adapters,
    count_parameters,
    matches,
    merge_adapters,
    official_name,
    replace_module,
    unmerge_adapters,
)
from .layer import AdapterLinear
from .saving import (
    FILE_FORMAT,
    adapter_state_dict,
    base_fingerprint,
    base_state_dict,
    load_adapters,
    read_adapter_metadata,
    save_adapters,
)
from .sparsity import SparsityMeter

__all__ = [
    "DEFAULT_TARGETS",
    "FILE_FORMAT",
    "GATES",
    "KINDS",
    "AdapterConfig",
    "AdapterLinear",
    "SparsityMeter",
    "adapter_modules",
    "adapter_state_dict",
    "attach",
    "attach_adapters",
    "base_fingerprint",
    "base_state_dict",
    "count_parameters",
    "load_adapters",
    "matches",
    "merge_adapters",
    "official_name",
    "read_adapter_metadata",
    "replace_module",
    "save_adapters",
    "unmerge_adapters",
]
