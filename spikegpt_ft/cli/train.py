"""``train.py`` / ``spikegpt-ft train``: fine-tune or pretrain SpikeGPT, fully or with LoRA / SpikeLoRA.

The flags are generated from the signatures of the classes they configure (jsonargparse), so every default
lives in one place: :class:`~spikegpt_ft.training.RunOptions`, the data modules, :class:`AdapterConfig`,
:class:`~spikegpt_ft.training.Optimization` and :class:`~spikegpt_ft.training.TrainerOptions`. The named
``--protocol`` (default ``default``) then sets its values, ``--config FILE`` overrides those, and a flag
overrides everything; ``--print_config`` shows the result.

Examples::

    python train.py --adapter spikelora --task subj
    python train.py --adapter lora --task subj --protocol spikelora-spikegpt --base PATH/TO/base.pth
    python train.py --task subj --adapter none --protocol spikegpt-nlu
    python train.py --task lm --text corpus.txt --base scratch --model small
    python train.py --adapter spikelora --task subj --resume          # continue an interrupted run
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from ..adapters import AdapterConfig
from ..data import TaskDataModule, TextDataModule
from ..training import LM_TASK, Optimization, RunOptions, TrainerOptions, TrainSpec, load_protocol, train
from ..training.run import command_line
from .common import USAGE_ERROR, quiet_libraries, run_guarded, underscore_flags

PROG = "train.py"
#: The classes whose signatures make the flags, and the parameters each leaves to another.
CLASS_GROUPS = (
    (RunOptions, set()),
    (TaskDataModule, {"task", "seed"}),
    (
        TextDataModule,
        {"seed", "tokenizer", "batch_size", "eval_batch_size", "val_fraction", "test_fraction", "num_workers"},
    ),
    (AdapterConfig, {"kind"}),
    (Optimization, set()),
    (TrainerOptions, set()),
)


def _parameters(cls: type, skip: set[str]) -> list[str]:
    import inspect

    return [n for n in inspect.signature(cls).parameters if n not in skip and n != "self"]


def build_parser() -> ArgumentParser:
    """The parser of ``train.py``, generated from the configured classes' signatures and docstrings."""
    parser = ArgumentParser(
        prog=PROG,
        description="Fine-tune SpikeGPT for sentence classification (full, LoRA or SpikeLoRA) or train it as a "
        "language model, with Lightning. Flags accept - or _ (--batch-size, --batch_size).",
        exit_on_error=True,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of option values")
    for cls, skip in CLASS_GROUPS:
        parser.add_class_arguments(cls, nested_key=None, skip=skip, fail_untyped=True)
    return parser


def _known_options() -> set[str]:
    return {name for cls, skip in CLASS_GROUPS for name in _parameters(cls, skip)}


def repeatable_text(argv: Sequence[str]) -> list[str]:
    """``--text A --text B`` -> a list of both (jsonargparse appends to a list with ``--text+``)."""
    return ["--text+" + a[len("--text") :] if a == "--text" or a.startswith("--text=") else a for a in argv]


def _boolean_options() -> set[str]:
    import inspect

    return {
        name
        for cls, skip in CLASS_GROUPS
        for name, p in inspect.signature(cls).parameters.items()
        if name not in skip and p.annotation in (bool, "bool")
    }


def bare_booleans(argv: Sequence[str]) -> list[str]:
    """``--resume`` alone (no value after it) -> ``--resume=true``, for every boolean option."""
    names = {f"--{n}" for n in _boolean_options()}
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in names and (i + 1 == len(out) or out[i + 1].startswith("--")):
            out[i] = f"{arg}=true"
    return out


def parse_args(argv: Sequence[str]) -> Namespace:
    """Parse ``argv`` with the chosen protocol's values as defaults (signature < protocol < --config < flag)."""
    argv = bare_booleans(repeatable_text(underscore_flags(argv)))
    parser = build_parser()
    first = parser.parse_args([a for a in argv if not a.startswith("--print_config")])
    protocol = load_protocol(first.protocol)
    protocol.check_options(_known_options())
    parser.set_defaults(**protocol.values(first.task, first.adapter))
    return parser.parse_args(argv)


def _pick(cls: type, values: dict, skip: set[str] = frozenset()) -> dict:
    return {name: values[name] for name in _parameters(cls, skip) if name in values}


def spec_from_args(ns: Namespace) -> TrainSpec:
    """The :class:`~spikegpt_ft.training.TrainSpec` the parsed options describe (types checked here)."""
    values = {k: v for k, v in ns.as_dict().items() if k not in ("config", "__path__")}
    run = RunOptions(**_pick(RunOptions, values))
    if run.is_lm:
        data = _pick(TextDataModule, values, {"seed"})
    else:
        if values.get("text"):
            raise ValueError(f"--text is for --task {LM_TASK}; a classification task reads its own files")
        data = _pick(TaskDataModule, values, {"task", "seed"})
    adapter = None
    if run.adapter != "none":
        options = _pick(AdapterConfig, values, {"kind"})
        if options.get("targets") is not None:
            options["targets"] = tuple(options["targets"])
        else:
            options.pop("targets", None)
        adapter = AdapterConfig(kind=run.adapter, **options)
    optimization = Optimization(**_pick(Optimization, values) | {"betas": tuple(values["betas"])})
    trainer = TrainerOptions(**_pick(TrainerOptions, values))
    return TrainSpec(run, data, optimization, trainer, adapter, command_line())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``train.py``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_libraries()

    def body() -> int:
        spec = spec_from_args(parse_args(argv))
        train(spec)
        return 0

    try:
        return run_guarded(PROG, body)
    except SystemExit as exit_:  # argparse: 2 for a usage error, 0 after --help / --print_config
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        return USAGE_ERROR
