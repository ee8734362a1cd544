"""The networks a run trains: a base (official file or fresh scratch model), then its head and adapters."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import adapters as ad
from ..model import SpikeGPT, init_scratch, load_model, read_preset

SCRATCH = "scratch"
#: What to do when the default base is not there.
BASE_HELP = (
    "The official SpikeGPT-216M weights are the .pth file of the Hugging Face repository "
    "ridger/SpikeGPT-OpenWebText-216M: save it as checkpoints/SpikeGPT-216M.pth or pass --base PATH. Any model.pth "
    "of a --task lm run is a base too; without one, train from scratch: --base scratch --model small"
)


@dataclass(frozen=True)
class BaseInfo:
    """Where a run's base came from: ``base`` is the resolved file or ``scratch:<preset>:<init>``."""

    base: str
    base_path: str | None
    preset: dict | None
    fingerprint: str

    @property
    def pretrained(self) -> bool:
        """Whether the base is a trained language model read from a file (not a fresh scratch model)."""
        return self.base_path is not None


def build_base(base: str | Path, preset: str | Path | None = None, init: str = "rwkv") -> tuple[SpikeGPT, BaseInfo]:
    """The base language model: an official-format ``.pth`` or, with ``base="scratch"``, a fresh model.

    A scratch model has the size ``preset`` names (:data:`~spikegpt_ft.model.PRESETS` or a YAML file) and is
    initialised by :func:`~spikegpt_ft.model.init_scratch` (scheme ``init``) from the current torch seed.
    """
    if str(base) == SCRATCH:
        if preset is None:
            raise ValueError("--base scratch needs a model size: --model tiny (or small, nlu-12x512, a YAML file)")
        size = read_preset(preset)
        model = init_scratch(SpikeGPT(size.config()), init)
        preset_info = asdict(size) | {"init": init}
        info = BaseInfo(f"{SCRATCH}:{size.name}:{init}", None, preset_info, ad.base_fingerprint(model))
        return model, info
    path = Path(base)
    if not path.is_file():
        raise FileNotFoundError(f"no SpikeGPT base checkpoint at {path}. {BASE_HELP}")
    model = load_model(path)
    resolved = str(path.resolve())
    return model, BaseInfo(resolved, resolved, None, ad.base_fingerprint(model))


def build_classifier(
    model: SpikeGPT,
    n_classes: int,
    adapter: ad.AdapterConfig | None = None,
    head_bias: bool = True,
    head_init_std: float | None = None,
) -> SpikeGPT:
    """Turn a base into a classifier, in place: a fresh ``n_classes`` head, then adapters unless ``None``.

    ``head_init_std`` draws the head's weight from N(0, std^2) (bias zero) instead of PyTorch's default.
    Without adapters every parameter trains (full fine-tuning).
    """
    model.reset_head(n_classes, bias=head_bias)
    if head_init_std is not None:
        with torch.no_grad():
            model.head.weight.normal_(0.0, head_init_std)
            if model.head.bias is not None:
                model.head.bias.zero_()
    if adapter is not None:
        ad.attach(model, adapter)
    return model.train()


def build_language_model(model: SpikeGPT, adapter: ad.AdapterConfig | None = None) -> SpikeGPT:
    """A base to go on training as a language model: in full, or with adapters and a frozen LM head."""
    if adapter is not None:
        ad.attach(model, adapter)
        if not any(ad.matches("head", t) for t in adapter.targets):
            model.head.requires_grad_(False)  # the vocabulary head is part of the base, as in PEFT
    return model.train()
