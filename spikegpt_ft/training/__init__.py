"""Training with Lightning: classification and language modelling, full or with adapters, under protocols.

- ``module.py``: what both objectives share (exact resume, seeded batches, history, sparsity);
  ``classifier.py`` and ``language_model.py``: the two objectives.
- ``optimization.py``: AdamW and its schedule; ``options.py``: run and trainer options.
- ``factory.py``: the networks (base, head, adapters); ``protocols.py``: named protocols.
- ``run.py``: :func:`train`, from options to a run directory.
"""

from .classifier import SpikeGPTClassifier, last_token_logits
from .factory import SCRATCH, BaseInfo, build_base, build_classifier, build_language_model
from .language_model import SpikeGPTLanguageModel
from .module import RunningMean, SpikeGPTModule
from .optimization import SCHEDULES, Optimization
from .options import ADAPTERS, LM_TASK, RunOptions, TrainerOptions
from .protocols import Protocol, load_protocol, protocol_names
from .run import TrainSpec, check_spec, train

__all__ = [
    "ADAPTERS",
    "LM_TASK",
    "SCHEDULES",
    "SCRATCH",
    "BaseInfo",
    "Optimization",
    "Protocol",
    "RunOptions",
    "RunningMean",
    "SpikeGPTClassifier",
    "SpikeGPTLanguageModel",
    "SpikeGPTModule",
    "TrainSpec",
    "TrainerOptions",
    "build_base",
    "build_classifier",
    "build_language_model",
    "check_spec",
    "last_token_logits",
    "load_protocol",
    "protocol_names",
    "train",
]
