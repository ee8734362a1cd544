"""The programs: ``train.py``, ``infer.py`` and the ``spikegpt-ft`` command that holds them and the tools.

``spikegpt-ft train|infer|bench|energy|report [ARGS]`` runs one of them; each has its own ``--help``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

COMMANDS = {
    "train": "fine-tune or pretrain SpikeGPT (train.py)",
    "infer": "classify, evaluate or generate with a trained run (infer.py)",
    "bench": "time the kernels, training steps, forward passes and decoding",
    "energy": "the energy account per token (operations, spike rates)",
    "report": "the table of measured runs beside the published numbers",
}


def _entry(name: str) -> Callable[[list[str]], object]:
    if name == "train":
        from .train import main
    elif name == "infer":
        from .infer import main
    elif name == "bench":
        from ..tools.bench import main
    elif name == "energy":
        from ..tools.energy import main
    else:
        from ..tools.report import main
    return main


def main(argv: Sequence[str] | None = None) -> int:
    """``spikegpt-ft COMMAND [ARGS]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        listing = "\n".join(f"  {name:<{width}}  {what}" for name, what in COMMANDS.items())
        stream = sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr
        print(f"usage: spikegpt-ft COMMAND [ARGS]\n\ncommands:\n{listing}", file=stream)
        return 0 if stream is sys.stdout else 2
    result = _entry(argv[0])(argv[1:])
    return result if isinstance(result, int) else 0
