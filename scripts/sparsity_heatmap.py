"""SpikeLoRA's test sparsity per adapted module and block, as a heatmap (the SpikeLoRA paper's Figure 3).

Reads every SpikeLoRA ``metrics.json`` under RUNS_DIR, averages ``test_sparsity_per_module`` over the seeds
of each gate, and writes one heatmap panel per gate (rows: the module in a block, columns: the block) to
``--out``, and the same numbers as Markdown tables on standard output.

Usage: ``python scripts/sparsity_heatmap.py RUNS_DIR --out sparsity.png``
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections import defaultdict
from pathlib import Path

from spikegpt_ft.tools.report import find_runs

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_BLOCK_MEAN = re.compile(r"^blocks\.(\d+)$")
#: The row of each block's mean over its adapted modules (the meter's ``"blocks.N"``), last in a table.
BLOCK_MEAN = "mean of the block"


def gate_tables(runs_dir: Path) -> dict[str, dict[tuple[str, int | None], float]]:
    """Per gate: (module, block or None for the head) -> test sparsity, averaged over that gate's seeds.

    Each block's mean over its modules is the module :data:`BLOCK_MEAN` of that block.
    """
    samples: dict[str, dict[tuple[str, int | None], list[float]]] = defaultdict(lambda: defaultdict(list))
    for _, metrics in find_runs(runs_dir):
        per_module = metrics.get("test_sparsity_per_module")
        if metrics.get("adapter") != "spikelora" or not per_module:
            continue
        for name, value in per_module.items():
            if name == "mean":
                continue
            match, mean = _BLOCK.match(name), _BLOCK_MEAN.match(name)
            key = (
                (match.group(2), int(match.group(1)))
                if match
                else (BLOCK_MEAN, int(mean.group(1)))
                if mean
                else (name, None)
            )
            samples[str(metrics.get("gate"))][key].append(float(value))
    return {gate: {k: statistics.fmean(v) for k, v in table.items()} for gate, table in samples.items()}


def table_axes(table: dict[tuple[str, int | None], float]) -> tuple[list[str], list[int]]:
    """The modules (rows) and blocks (columns) of a gate's table; the head (block None) is in neither."""
    modules = sorted({m for m, b in table if b is not None}, key=lambda m: (m == BLOCK_MEAN, m))
    return modules, sorted({b for _, b in table if b is not None})


def markdown(gate: str, table: dict[tuple[str, int | None], float]) -> str:
    """One gate's sparsities as a Markdown table: a row per module, a column per block."""
    modules, blocks = table_axes(table)
    lines = [f"| {gate} gate | " + " | ".join(f"block {b}" for b in blocks) + " |"]
    lines.append("| --- |" + " ---: |" * len(blocks))
    for module in modules:
        cells = [f"{table[(module, b)]:.3f}" if (module, b) in table else "–" for b in blocks]
        lines.append(f"| {module} | " + " | ".join(cells) + " |")
    for (module, block), value in sorted(table.items(), key=str):
        if block is None:
            lines.append(f"| {module} | {value:.3f} |" + " |" * (len(blocks) - 1))
    return "\n".join(lines)


def plot(tables: dict[str, dict[tuple[str, int | None], float]], out: Path) -> None:
    """Write the heatmaps, one panel per gate, on one colour scale from 0 to 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(4.5 * len(tables), 3.6), squeeze=False)
    for ax, (gate, table) in zip(axes[0], sorted(tables.items()), strict=True):
        modules, blocks = table_axes(table)
        grid = [[table.get((m, b), float("nan")) for b in blocks] for m in modules]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k", fontsize=8)
        ax.set_xticks(range(len(blocks)), [str(b) for b in blocks])
        ax.set_yticks(range(len(modules)), modules)
        ax.set_xlabel("block")
        ax.set_title(f"SpikeLoRA sparsity, {gate} gate")
    fig.colorbar(image, ax=axes[0].tolist(), label="fraction of zeros of S(Ax)·Ax")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="the heatmap PNG to write")
    args = parser.parse_args()
    tables = gate_tables(args.runs_dir)
    if not tables:
        raise SystemExit(f"no SpikeLoRA run with per-module sparsity under {args.runs_dir}")
    plot(tables, args.out)
    for gate, table in sorted(tables.items()):
        print(markdown(gate, table), end="\n\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
