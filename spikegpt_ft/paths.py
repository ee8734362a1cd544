"""Where the project looks for what the user did not name: data, tokenizer, base weights.

A checkout keeps them beside the package (``data/``, ``checkpoints/``) with the shared folder next to the
repository (``../shared``); an installed package has no checkout, so the current directory is searched
first. Every default path in the package is built here, so that the search order is written once.
"""

from __future__ import annotations

from pathlib import Path

#: The checkout holding the package (``spikegpt_ft/..``); for an installed package, a folder of no meaning.
CHECKOUT = Path(__file__).resolve().parents[1]


def search_roots() -> list[Path]:
    """The folders defaults are looked for under, in order: the current directory, then the checkout."""
    roots = [Path.cwd().resolve(), CHECKOUT]
    return list(dict.fromkeys(roots))


def candidates(*relative: str) -> list[Path]:
    """``relative`` under every search root, and under the ``shared`` folder beside each, in order."""
    out: list[Path] = []
    for root in search_roots():
        out += [root / r for r in relative]
    for root in search_roots():
        out += [root.parent / "shared" / r for r in relative]
    return list(dict.fromkeys(out))
