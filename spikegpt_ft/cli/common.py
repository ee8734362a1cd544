"""What both programs share: flag spelling, quiet library output, and how errors reach the user."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence

#: Exit status of a usage or input error (argparse's): the program stopped before doing anything.
USAGE_ERROR = 2


def underscore_flags(argv: Sequence[str]) -> list[str]:
    """``--foo-bar[=x]`` -> ``--foo_bar[=x]``: the flags are the signatures' names; both spellings are accepted."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, sep, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + sep + value
        out.append(arg)
    return out


def quiet_libraries() -> None:
    """Filter the libraries' internal warnings and progress bars, which ask nothing of the user.

    Done here, in the programs, and never in the library, so code that imports spikegpt_ft sees everything.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    for message in (
        r"Checkpoint directory .* exists and is not empty",
        r".*does not have many workers.*",
        r"The number of training batches .* is smaller than the logging interval",
        r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*",
        r".*GPU available but not used.*",
        r".*Trying to infer the `batch_size`.*",
        r"You have overridden `on_before_batch_transfer`.*",
    ):
        warnings.filterwarnings("ignore", message=message)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def run_guarded(prog: str, body: Callable[[], int]) -> int:
    """Run ``body``; a bad input (``FileNotFoundError``, ``ValueError``) is one line on stderr and exit 2."""
    try:
        return body()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
