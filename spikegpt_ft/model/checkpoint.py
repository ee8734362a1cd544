"""Official SpikeGPT state dicts: reading them (``load_model``) and writing them (``save_official``).

The official code saves a plain ``state_dict`` (``torch.save``) whose key names are the parameter names of
:class:`~spikegpt_ft.model.SpikeGPT`, with no config: the sizes are read from the tensor shapes. Reading
uses ``torch.load(weights_only=True)``, which never unpickles arbitrary objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..files import atomic_torch_save
from .spikegpt import SpikeGPT, SpikeGPTConfig

#: Keys every SpikeGPT state dict has, whatever its size.
REQUIRED_KEYS = ("emb.weight", "head.weight", "ln_out.weight")


def read_state_dict(source: str | Path | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """The SpikeGPT state dict of a ``.pth`` file, or ``source`` itself if it is a mapping; checked for its keys.

    A file that is not a PyTorch checkpoint, or holds anything but names mapped to tensors, or lacks the keys
    every SpikeGPT has, is a ``ValueError`` naming it.
    """
    what = "the state dict given"
    if isinstance(source, Mapping):
        sd = source
    else:
        path = Path(source)
        what = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"no SpikeGPT checkpoint at {path}")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a file that is not a checkpoint
            raise ValueError(f"{path} is not a readable PyTorch checkpoint: {err}") from err
        if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    missing = [k for k in REQUIRED_KEYS if k not in sd]
    if missing:
        raise ValueError(
            f"{what} is not a SpikeGPT state dict: missing keys {missing}; "
            f"its keys are {sorted(sd)[:10]}{' ...' if len(sd) > 10 else ''}"
        )
    return sd


def load_model(
    source: str | Path | Mapping[str, torch.Tensor],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SpikeGPT:
    """Load an official SpikeGPT state dict (a ``.pth`` path or the dict itself) in eval mode.

    The config is read from the tensor shapes; weights stored as fp32, bf16 or fp16 are converted to
    ``dtype`` (the recurrent state stays float32 whatever it is). A dict that is not a SpikeGPT state dict
    gets a ``ValueError`` naming the missing and unexpected keys.
    """
    sd = read_state_dict(source)
    model = SpikeGPT(SpikeGPTConfig.from_state_dict(sd))
    result = model.load_state_dict(dict(sd), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"not a SpikeGPT state dict: missing keys {result.missing_keys}, unexpected keys {result.unexpected_keys}"
        )
    return model.to(device=device, dtype=dtype).eval()


def save_official(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write ``state_dict`` (official key names) as a ``.pth`` the official code and :func:`load_model` read.

    The tensors are written contiguous, on the CPU, in the dtype they have; the file is written atomically.
    """
    missing = [k for k in REQUIRED_KEYS if k not in state_dict]
    if missing:
        raise ValueError(f"not a SpikeGPT language-model state dict: missing keys {missing}")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    return atomic_torch_save(tensors, path)
