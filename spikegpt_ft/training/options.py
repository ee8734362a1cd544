"""The options of a training run that belong to no library class: what to train, where, and the trainer's."""

from __future__ import annotations

from dataclasses import dataclass

from ..model import SCRATCH_INITS

#: What ``--task`` accepts beyond the classification tasks: language modelling on a text corpus.
LM_TASK = "lm"
ADAPTERS = ("none", "lora", "spikelora")
SELECTIONS = ("best", "last")


@dataclass(frozen=True)
class RunOptions:
    """What to train and where.

    Args:
        task: subj, mr, sst2, sst5, or lm (a language model on the text of ``--text``).
        adapter: none (full fine-tuning), lora or spikelora.
        base: an official-format SpikeGPT .pth, or scratch (a fresh model of the size ``--model``).
        model: size of a scratch base: a preset (tiny, small, nlu-12x512, nlu-24x768, 216m) or a YAML file.
        init: initialisation of a scratch base: rwkv (RWKV-v4's, as the official SpikeGPT code), pytorch, or
            wide (every matrix N(0, 4 / fan_in)); see ``spikegpt_ft.model.init``.
        protocol: the named protocol whose values are the defaults (see ``spikegpt_ft/protocols/``).
        seed: seed of the split, the initialisation and the data order.
        seeds: several seeds, e.g. 0,1,2,3,4 (one run each; overrides seed).
        output_dir: run directory (default runs/<task>-<adapter>-seed<N>; {task}, {adapter}, {seed} expand).
        resume: continue the run in the output directory from its last.ckpt.
        overwrite: start afresh in a directory that holds a run.
        select: which epoch's weights are tested and exported: best (highest validation accuracy, or lowest
            validation loss for lm) or last.
        head_bias: give the classification head a bias.
        head_init_std: draw the classification head's weight from N(0, std^2) (default: PyTorch's init).
    """

    task: str
    adapter: str = "spikelora"
    base: str = "checkpoints/SpikeGPT-216M.pth"
    model: str = "small"
    init: str = "rwkv"
    protocol: str = "default"
    seed: int = 0
    seeds: str | None = None
    output_dir: str | None = None
    resume: bool = False
    overwrite: bool = False
    select: str = "best"
    head_bias: bool = True
    head_init_std: float | None = None

    def __post_init__(self) -> None:
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}, got {self.adapter!r}")
        if self.init not in SCRATCH_INITS:
            raise ValueError(f"init must be one of {SCRATCH_INITS}, got {self.init!r}")
        if self.select not in SELECTIONS:
            raise ValueError(f"select must be one of {SELECTIONS}, got {self.select!r}")
        if self.head_init_std is not None and not self.head_init_std > 0:
            raise ValueError(f"head_init_std must be positive, got {self.head_init_std}")

    @property
    def is_lm(self) -> bool:
        """Whether the run trains a language model."""
        return self.task == LM_TASK

    def seed_list(self) -> list[int]:
        """The seeds to run: ``seeds`` parsed, else ``[seed]``."""
        if self.seeds is None:
            return [self.seed]
        try:
            seeds = [int(s) for s in str(self.seeds).replace(" ", "").split(",") if s != ""]
        except ValueError:
            raise ValueError(f"seeds takes integers separated by commas, got {self.seeds!r}") from None
        if not seeds:
            raise ValueError("seeds is empty")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds repeats a seed: {self.seeds!r}")
        return seeds


@dataclass(frozen=True)
class TrainerOptions:
    """How Lightning's Trainer runs.

    Args:
        epochs: training epochs.
        grad_clip: clip the gradients' global norm to this (0 = no clipping).
        accumulate_grad_batches: batches per optimiser step.
        precision: Lightning precision; auto is bf16-mixed on a GPU that has bf16, else 32-true.
        accelerator: cpu, gpu, cuda or auto.
        devices: number of devices, a list such as [0, 1], or auto.
        strategy: auto, ddp, ddp_spawn, ...
        progress_bar: show a progress bar.
        log_every_n_steps: steps between logged training losses.
    """

    epochs: int = 10
    grad_clip: float = 1.0
    accumulate_grad_batches: int = 1
    precision: str = "auto"
    accelerator: str = "auto"
    devices: str = "auto"
    strategy: str = "auto"
    progress_bar: bool = True
    log_every_n_steps: int = 20

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip}")
        if self.accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {self.accumulate_grad_batches}")
