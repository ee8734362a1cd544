"""What an adapted model is: :class:`AdapterConfig`, stored with every adapter file and run."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

#: Kinds of adapter.
KINDS = ("lora", "spikelora")

#: How SpikeLoRA's LIF gate runs. ``temporal``: one membrane per rank channel carried along the tokens (the
#: recurrent state carries it). ``pointwise``: the membrane starts from rest at every token, so a channel
#: passes iff ``(A x) / tau >= v_threshold`` there (the SpikeLoRA authors' released code resets its neuron
#: at every call); nothing is carried.
GATES = ("temporal", "pointwise")

#: Every linear layer inside the blocks (7 per block); the head is trained in full instead.
DEFAULT_TARGETS = (
    "att.key",
    "att.value",
    "att.receptance",
    "att.output",
    "ffn.key",
    "ffn.value",
    "ffn.receptance",
)

#: Fields of the first adapter-file format and what they are called now (files without ``gate`` are temporal).
LEGACY_NAMES = {"r": "rank", "dropout": "lora_dropout"}


@dataclass(frozen=True)
class AdapterConfig:
    """How a model is adapted.

    Args:
        kind: ``lora`` or ``spikelora``.
        rank: adapter rank r.
        alpha: LoRA alpha; ``None`` is ``sqrt(rank)`` (the SpikeLoRA paper's default), stored resolved.
        rslora: scale the update by ``alpha / sqrt(rank)`` (rsLoRA) instead of ``alpha / rank``.
        lora_dropout: dropout on the adapters' input.
        v_threshold: SpikeLoRA gate threshold V_th.
        tau: SpikeLoRA gate time constant (SpikingJelly's LIF, decay_input, hard reset to 0).
        gate: SpikeLoRA gate mode, ``temporal`` (membrane along the tokens) or ``pointwise`` (reset per token).
        targets: module-name patterns of the adapted linear layers (dotted suffixes or regexes).
    """

    kind: str = "spikelora"
    rank: int = 8
    alpha: float | None = None
    rslora: bool = True
    lora_dropout: float = 0.0
    v_threshold: float = 0.1
    tau: float = 2.0
    gate: str = "temporal"
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"adapter kind must be one of {KINDS}, got {self.kind!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"adapter rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha is None:
            object.__setattr__(self, "alpha", math.sqrt(self.rank))
        if isinstance(self.alpha, bool) or not (
            isinstance(self.alpha, int | float) and math.isfinite(self.alpha) and self.alpha > 0
        ):
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.lora_dropout, bool) or not (
            isinstance(self.lora_dropout, int | float) and 0.0 <= self.lora_dropout < 1.0
        ):
            raise ValueError(f"adapter dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.gate not in GATES:
            raise ValueError(f"the SpikeLoRA gate must be one of {GATES}, got {self.gate!r}")
        for name in ("v_threshold", "tau"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, int | float) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.v_threshold <= 0:
            raise ValueError(f"v_threshold must be positive, got {self.v_threshold!r}")
        if self.tau <= 1:
            raise ValueError(f"the LIF time constant tau must be > 1, got {self.tau!r}")
        if isinstance(self.targets, str) or not self.targets or not all(isinstance(t, str) for t in self.targets):
            raise ValueError(f"targets must be a non-empty sequence of name patterns, got {self.targets!r}")
        # normalise types so that equal configs compare (and serialise) equal
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "lora_dropout", float(self.lora_dropout))
        object.__setattr__(self, "v_threshold", float(self.v_threshold))
        object.__setattr__(self, "tau", float(self.tau))
        object.__setattr__(self, "rslora", bool(self.rslora))
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scaling(self) -> float:
        """``alpha / sqrt(rank)`` with rsLoRA, else ``alpha / rank``."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def gated(self) -> bool:
        """Whether the adapters have a spiking gate (SpikeLoRA)."""
        return self.kind == "spikelora"

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> AdapterConfig:
        """Inverse of :meth:`to_dict`; also reads the first file format (``r``, ``dropout``, no ``gate``).

        Unknown or missing keys are a ``ValueError``.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"an adapter config must be a mapping, got {type(d).__name__}")
        values = {LEGACY_NAMES.get(k, k): v for k, v in d.items()}
        if "gate" not in values and "r" in d:
            values["gate"] = "temporal"  # files written before the pointwise gate existed
        names = set(cls.__dataclass_fields__)
        if set(values) != names:
            missing, unknown = sorted(names - set(values)), sorted(set(values) - names)
            raise ValueError(f"adapter config: missing keys {missing}, unknown keys {unknown}")
        targets = values["targets"]
        if isinstance(targets, str) or not isinstance(targets, list | tuple):
            raise ValueError(f"adapter config: targets must be a list of patterns, got {targets!r}")
        return cls(**{**values, "targets": tuple(targets)})
