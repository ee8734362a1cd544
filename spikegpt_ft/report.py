"""Compare fine-tuning methods over seeds: ``python -m spikegpt_ft.report RUNS_DIR [--out DIR]``.

Finds every ``metrics.json`` under ``RUNS_DIR`` (recursively), groups the runs by task, method
(adapter ``none`` = full fine-tuning, ``lora``, ``spikelora``) and base model, and writes

- ``report.md``: per group the mean ± sample standard deviation (n - 1) over seeds of the test accuracy,
  the mean validation accuracy, sparsity, trainable parameters, training time per epoch and peak memory,
  beside the published Subj numbers (SpikeLoRA paper, Table 4), every row marked "published" or
  "measured here";
- ``report.png``: the accuracies as a bar chart (error bars: the standard deviation over seeds).

A ``metrics.json`` that cannot be read, or lacks ``task``, ``adapter`` or a ``test_accuracy`` in [0, 1],
is skipped with a warning naming it. No ``metrics.json`` at all (or none usable) is an error (exit 2).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

#: Where the published numbers come from.
PUBLISHED_SOURCE = "SpikeLoRA paper, Table 4"
#: Published test accuracies (%) per task: (method, accuracy).
PUBLISHED = {
    "subj": [
        ("SpikeGPT trained from scratch", 89.10),
        ("Full fine-tuning", 95.30),
        ("LoRA", 90.70),
        ("SpikeLoRA", 91.10),
    ],
}
#: Display names of the ``adapter`` values train.py writes; other values are shown as they are.
METHODS = {"none": "Full fine-tuning", "lora": "LoRA", "spikelora": "SpikeLoRA"}
METHOD_ORDER = ["SpikeGPT trained from scratch", "Full fine-tuning", "LoRA", "SpikeLoRA"]
TASK_ORDER = ["subj", "mr", "sst2", "sst5"]
PUBLISHED_LABEL = "published"
MEASURED_LABEL = "measured here"
DASH = "–"


class ReportError(Exception):
    """Input the report cannot be made from (exit status 2)."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def read_metrics(path: Path) -> dict | None:
    """The run's metrics, or ``None`` (after a warning naming ``path``) when they are unusable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        warn(f"skipping {path}: not readable JSON ({err})")
        return None
    if not isinstance(data, dict):
        warn(f"skipping {path}: expected a JSON object, got {type(data).__name__}")
        return None
    problems = [k for k in ("task", "adapter") if not isinstance(data.get(k), str) or not data.get(k)]
    accuracy = _number(data.get("test_accuracy"))
    if accuracy is None or not 0.0 <= accuracy <= 1.0:
        problems.append("test_accuracy (a fraction in [0, 1])")
    if problems:
        warn(f"skipping {path}: missing or invalid {', '.join(problems)}")
        return None
    return data


def find_runs(runs_dir: str | Path) -> list[tuple[Path, dict]]:
    """Every usable ``metrics.json`` under ``runs_dir``, sorted by path."""
    root = Path(runs_dir)
    if not root.exists():
        raise ReportError(f"runs directory not found: {root}")
    if not root.is_dir():
        raise ReportError(f"not a directory: {root}")
    paths = sorted(root.rglob("metrics.json"))
    if not paths:
        raise ReportError(f"no metrics.json found under {root} (train.py writes one per run)")
    runs = [(p, m) for p in paths if (m := read_metrics(p)) is not None]
    if not runs:
        raise ReportError(f"none of the {len(paths)} metrics.json files under {root} could be used (see warnings)")
    return runs


@dataclass
class Row:
    """One line of the table: a published number, or the runs of one task, method and base."""

    task: str
    method: str
    source: str
    base: str = DASH
    accuracies: list[float] = field(default_factory=list)  # test accuracies in %
    extras: dict[str, list[float]] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else None

    def extra(self, key: str) -> float | None:
        values = self.extras.get(key) or []
        return statistics.fmean(values) if values else None


EXTRA_KEYS = ("val_accuracy", "sparsity", "trainable_params", "total_params", "epoch_time_s", "peak_memory_mb")


def _sort_key(row: Row) -> tuple:
    """Tasks in the usual order; within a task the published rows first, then methods in order."""
    t = TASK_ORDER.index(row.task) if row.task in TASK_ORDER else len(TASK_ORDER)
    m = METHOD_ORDER.index(row.method) if row.method in METHOD_ORDER else len(METHOD_ORDER)
    return t, row.task, row.source != PUBLISHED_LABEL, m, row.method, row.base


def build_rows(runs: list[tuple[Path, dict]]) -> list[Row]:
    """Published rows for every task that has them, then measured rows per (task, method, base)."""
    groups: dict[tuple[str, str, str], Row] = {}
    for _, m in runs:
        task = m["task"].lower()
        method = METHODS.get(m["adapter"].lower(), m["adapter"])
        base = Path(str(m["base"])).name if m.get("base") else DASH
        row = groups.setdefault((task, method, base), Row(task, method, MEASURED_LABEL, base))
        row.accuracies.append(100.0 * m["test_accuracy"])
        for key in EXTRA_KEYS:
            if (value := _number(m.get(key))) is not None:
                row.extras.setdefault(key, []).append(value)
    tasks = {t for t, _, _ in groups} | set(PUBLISHED)
    published = [
        Row(t, method, PUBLISHED_LABEL, accuracies=[acc]) for t in tasks for method, acc in PUBLISHED.get(t, [])
    ]
    return sorted(published + list(groups.values()), key=_sort_key)


def format_accuracy(row: Row) -> str:
    """``mean ± std`` with two decimals (std over seeds, n - 1); a published or single-seed row has no std."""
    if row.source == PUBLISHED_LABEL:
        return f"{row.mean:.2f}"
    std = row.std
    return f"{row.mean:.2f} ± {std:.2f}" if std is not None else f"{row.mean:.2f} ± {DASH}"


def _fraction_or_percent(value: float | None) -> str:
    if value is None:
        return DASH
    return f"{100 * value:.2f}" if value <= 1.0 else f"{value:.2f}"


def _params(row: Row) -> str:
    trainable, total = row.extra("trainable_params"), row.extra("total_params")
    if trainable is None:
        return DASH
    text = f"{trainable:,.0f}"
    return f"{text} ({100 * trainable / total:.2f} %)" if total else text


def _plain(value: float | None, digits: int) -> str:
    return DASH if value is None else f"{value:,.{digits}f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(rows: list[Row], runs_dir: Path, n_runs: int) -> str:
    header = [
        "Task", "Method", "Source", "Base", "Seeds", "Test acc. (%)", "Val acc. (%)", "Sparsity (%)",
        "Trainable params", "Time / epoch (s)", "Peak memory (MB)",
    ]  # fmt: skip
    lines = [
        "# SpikeGPT fine-tuning: full fine-tuning vs LoRA vs SpikeLoRA",
        "",
        f"{n_runs} run(s) found under `{runs_dir}`. Rows marked **{MEASURED_LABEL}** are the runs' "
        "`metrics.json`: test accuracy as mean ± sample standard deviation (n - 1) over seeds, the other "
        "columns as means over seeds. Rows marked **published** are the numbers reported in the "
        f"{PUBLISHED_SOURCE} (Subj), not measured here.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in rows:
        measured = r.source == MEASURED_LABEL
        cells = [
            r.task,
            r.method,
            f"{r.source} ({PUBLISHED_SOURCE})" if not measured else r.source,
            r.base,
            str(len(r.accuracies)) if measured else DASH,
            format_accuracy(r),
            _fraction_or_percent(r.extra("val_accuracy")) if measured else DASH,
            _fraction_or_percent(r.extra("sparsity")) if measured else DASH,
            _params(r) if measured else DASH,
            _plain(r.extra("epoch_time_s"), 1) if measured else DASH,
            _plain(r.extra("peak_memory_mb"), 0) if measured else DASH,
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", "![accuracy per task and method](report.png)", ""]
    return "\n".join(lines)


def chart(rows: list[Row], path: Path) -> None:
    """Bar chart of test accuracy per task: measured (error bars) and published (hatched) side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r.task for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(5.0, 4.5 * len(tasks)), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        task_rows = [r for r in rows if r.task == task]
        labels = [
            f"{r.method}\n({'published' if r.source == PUBLISHED_LABEL else 'measured, ' + r.base})" for r in task_rows
        ]
        means = [r.mean for r in task_rows]
        errors = [r.std or 0.0 for r in task_rows]
        colors = ["#bbbbbb" if r.source == PUBLISHED_LABEL else "#1f77b4" for r in task_rows]
        bars = ax.bar(range(len(task_rows)), means, yerr=errors, capsize=4, color=colors, edgecolor="black")
        for bar, r in zip(bars, task_rows, strict=True):
            if r.source == PUBLISHED_LABEL:
                bar.set_hatch("//")
            top = bar.get_height() + (r.std or 0.0)
            ax.annotate(f"{r.mean:.1f}", (bar.get_x() + bar.get_width() / 2, top), ha="center",
                        va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")  # fmt: skip
        ax.set_xticks(range(len(task_rows)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_xlim(-0.6, max(len(task_rows), 3) - 0.4)  # a lone bar keeps a normal width
        low = min(m - e for m, e in zip(means, errors, strict=True))
        ax.set_ylim(max(0.0, math.floor(low / 5) * 5 - 5), 100)
        ax.set_title(task)
        ax.set_ylabel("test accuracy (%)")
    from matplotlib.patches import Patch

    fig.legend(
        handles=[
            Patch(facecolor="#1f77b4", edgecolor="black", label="measured here (mean ± std over seeds)"),
            Patch(facecolor="#bbbbbb", edgecolor="black", hatch="//", label=f"published ({PUBLISHED_SOURCE})"),
        ],
        loc="upper center",
        ncol=2,
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(runs_dir: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.png`` into ``out_dir`` (default ``runs_dir``); returns their paths."""
    runs_dir = Path(runs_dir)
    runs = find_runs(runs_dir)
    rows = build_rows(runs)
    out = Path(out_dir) if out_dir is not None else runs_dir
    out.mkdir(parents=True, exist_ok=True)
    md, png = out / "report.md", out / "report.png"
    md.write_text(markdown(rows, runs_dir, len(runs)), encoding="utf-8")
    chart(rows, png)
    return md, png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spikegpt_ft.report", description=__doc__.split("\n")[0])
    parser.add_argument("runs_dir", help="directory searched recursively for metrics.json")
    parser.add_argument("--out", help="where report.md and report.png go (default: RUNS_DIR)")
    args = parser.parse_args(argv)
    try:
        md, png = write_report(args.runs_dir, args.out)
    except (ReportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
