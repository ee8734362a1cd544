"""Compare the runs with the published numbers: ``spikegpt-ft report RUNS_DIR [--out DIR]``.

(or ``python -m spikegpt_ft.tools.report``.) Finds every ``metrics.json`` under ``RUNS_DIR`` (recursively),
groups the runs by task, adapter, protocol, base and gate (one group: the seeds of one setting), and writes

- ``report.md``:

  - the classification groups, each placed beside the published row it reproduces (SpikeLoRA paper,
    Table 4, Subj): a scratch base with adapter ``none`` beside "SpikeGPT trained from scratch", a pretrained
    base (an official ``.pth``) with adapter ``none`` beside "Full fine-tuning", with ``lora`` beside "LoRA",
    with ``spikelora`` beside "SpikeLoRA". Adapters on a scratch base (a random frozen base) have no published
    counterpart, nor has any setting of another task, and say so.
    Per group: the test accuracy (mean ± sample standard deviation over seeds), two 95 % intervals: (a) per run,
    binomial over its ``n`` test texts (Wilson score interval, ``n = metrics["splits"]["test"]``), (b) over
    seeds, ``mean ± t(0.975, n - 1) s / sqrt(n)`` (at least two seeds), and whether the published value lies
    inside each interval; then validation accuracy, sparsity, trainable parameters, time per epoch, peak
    memory (means over seeds);
  - the SpikeGPT paper's NLU results (a secondary source, listed as such);
  - language-model runs (task ``lm``) in their own table: test loss, perplexity, bits per byte;

- ``report.png``: the classification accuracies as a bar chart (error bars: the 95 % interval over seeds, or
  the Wilson interval of a single run), published values hatched.

A ``metrics.json`` that cannot be read, or lacks ``task``, ``adapter`` or its test figure (``test_accuracy``
in [0, 1]; ``test_loss`` for ``lm``), is skipped with a warning naming it. No ``metrics.json`` at all (or
none usable) is an error (exit 2).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

#: Where the published numbers the runs are placed beside come from.
PUBLISHED_SOURCE = "SpikeLoRA paper, Table 4"
#: Published test accuracies (%) per task, by what they reproduce: (method, accuracy).
PUBLISHED = {
    "subj": {
        "scratch": ("SpikeGPT trained from scratch", 89.10),
        "full": ("Full fine-tuning", 95.30),
        "lora": ("LoRA", 90.70),
        "spikelora": ("SpikeLoRA", 91.10),
    },
}
COUNTERPART_ORDER = ("scratch", "full", "lora", "spikelora")
#: The SpikeGPT paper's NLU results (%), listed apart: (task, model, accuracy).
SPIKEGPT_NLU_SOURCE = "SpikeGPT paper (Zhu et al.), NLU results; secondary source, not verified against the paper's PDF"
SPIKEGPT_NLU = (
    ("sst2", "SpikeGPT 216M fine-tuned", 88.76),
    ("sst5", "SpikeGPT 216M fine-tuned", 51.27),
    ("mr", "SpikeGPT 216M fine-tuned", 85.63),
    ("subj", "SpikeGPT 216M fine-tuned", 95.30),
)
NO_COUNTERPART_SCRATCH = "no published counterpart: adapters on a random frozen base"
NO_COUNTERPART = "no published counterpart"
METHODS = {"lora": "LoRA", "spikelora": "SpikeLoRA"}
TASK_ORDER = ["subj", "mr", "sst2", "sst5"]
LM_TASK = "lm"
PUBLISHED_LABEL = "published"
MEASURED_LABEL = "measured here"
INSIDE = "inside the interval"
OUTSIDE = "outside the interval"
DASH = "–"
#: The 97.5 % quantile of the standard normal distribution (two-sided 95 %).
Z95 = 1.959963984540054
#: The 97.5 % quantiles of Student's t distribution for 1..30 degrees of freedom.
T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip


class ReportError(Exception):
    """Input the report cannot be made from (exit status 2)."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


# --------------------------------------------------------------------------------------------- statistics


def t_quantile(dof: int) -> float:
    """The 97.5 % quantile of Student's t with ``dof`` degrees of freedom (table up to 30, then an expansion).

    Above 30 the Cornish-Fisher expansion around the normal quantile (error below 1e-4 there).
    """
    if dof < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {dof}")
    if dof <= len(T975):
        return T975[dof - 1]
    z = Z95
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ``correct / n`` (fractions)."""
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n and n >= 1, got correct={correct}, n={n}")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def t_interval(values: list[float]) -> tuple[float, float] | None:
    """``mean ± t(0.975, n - 1) s / sqrt(n)`` of ``values``; ``None`` for fewer than two."""
    n = len(values)
    if n < 2:
        return None
    mean, half = statistics.fmean(values), t_quantile(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean - half, mean + half


def verdict(value: float, interval: tuple[float, float]) -> str:
    """Whether ``value`` lies inside ``interval`` (bounds included)."""
    return INSIDE if interval[0] <= value <= interval[1] else OUTSIDE


# --------------------------------------------------------------------------------------------- reading


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
    if isinstance(data.get("task"), str) and data["task"].lower() == LM_TASK:
        if _number(data.get("test_loss")) is None:
            problems.append("test_loss (a language-model run)")
    else:
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
        raise ReportError(f"no metrics.json found under {root} (training writes one per run)")
    runs = [(p, m) for p in paths if (m := read_metrics(p)) is not None]
    if not runs:
        raise ReportError(f"none of the {len(paths)} metrics.json files under {root} could be used (see warnings)")
    return runs


# --------------------------------------------------------------------------------------------- groups


def base_kind(base: object) -> str:
    """``"scratch"`` (``scratch:<preset>:<init>``), ``"pretrained"`` (a checkpoint) or ``"unknown"`` (not given)."""
    if not isinstance(base, str) or not base:
        return "unknown"
    return "scratch" if base == "scratch" or base.startswith("scratch:") else "pretrained"


def counterpart_key(adapter: str, kind: str) -> str | None:
    """Which published row a setting reproduces (a key of :data:`PUBLISHED`'s tasks), if any."""
    adapter = adapter.lower()
    if kind == "scratch":
        return "scratch" if adapter == "none" else None
    if kind == "pretrained":
        return "full" if adapter == "none" else adapter if adapter in ("lora", "spikelora") else None
    return None


@dataclass
class Group:
    """The runs of one setting: task, adapter, protocol, base and gate; one run per seed."""

    task: str
    adapter: str
    protocol: str | None
    base: str | None
    gate: str | None
    runs: list[dict] = field(default_factory=list)

    @property
    def key(self) -> tuple:
        return self.task, self.adapter, self.protocol, self.base, self.gate

    @property
    def kind(self) -> str:
        return base_kind(self.base)

    @property
    def method(self) -> str:
        if self.adapter.lower() == "none":
            return "Trained from scratch" if self.kind == "scratch" else "Full fine-tuning"
        return METHODS.get(self.adapter.lower(), self.adapter)

    @property
    def counterpart(self) -> str | None:
        key = counterpart_key(self.adapter, self.kind)
        return key if key in PUBLISHED.get(self.task, {}) else None

    @property
    def published(self) -> float | None:
        key = self.counterpart
        return None if key is None else PUBLISHED[self.task][key][1]

    def no_counterpart_reason(self) -> str:
        if self.kind == "scratch" and self.adapter.lower() != "none":
            return NO_COUNTERPART_SCRATCH
        if self.task not in PUBLISHED:
            return f"{NO_COUNTERPART} (the {PUBLISHED_SOURCE} reports Subj only)"
        return NO_COUNTERPART

    @property
    def accuracies(self) -> list[float]:
        """Test accuracies in %, one per run."""
        return [100.0 * m["test_accuracy"] for m in self.runs]

    def values(self, *keys: str) -> list[float]:
        """The finite numbers the runs hold under the first of ``keys`` each has."""
        out = []
        for m in self.runs:
            for key in keys:
                if (value := _number(m.get(key))) is not None:
                    out.append(value)
                    break
        return out

    def mean(self, *keys: str) -> float | None:
        values = self.values(*keys)
        return statistics.fmean(values) if values else None

    def wilson(self) -> list[tuple[object, int, tuple[float, float]]]:
        """Per run with a test size: (seed, n, Wilson 95 % interval in %) of its test accuracy."""
        out = []
        for m in self.runs:
            splits = m.get("splits")
            n = splits.get("test") if isinstance(splits, dict) else None
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                continue
            lo, hi = wilson_interval(round(m["test_accuracy"] * n), n)
            out.append((m.get("seed"), n, (100.0 * lo, 100.0 * hi)))
        return out

    def seed_interval(self) -> tuple[float, float] | None:
        """The t interval over seeds of the test accuracy, in %."""
        return t_interval(self.accuracies)

    def fingerprints(self) -> list[str]:
        return sorted({str(m["base_fingerprint"])[:12] for m in self.runs if m.get("base_fingerprint")})


def group_runs(runs: list[tuple[Path, dict]]) -> tuple[list[Group], list[Group]]:
    """Classification groups and language-model groups, keyed by (task, adapter, protocol, base, gate)."""
    groups: dict[tuple, Group] = {}
    for _, m in runs:
        task = m["task"].lower()
        gate = m.get("gate") if isinstance(m.get("gate"), str) else None
        protocol = m.get("protocol") if isinstance(m.get("protocol"), str) else None
        base = m.get("base") if isinstance(m.get("base"), str) else None
        g = Group(task, m["adapter"], protocol, base, gate)
        groups.setdefault(g.key, g).runs.append(m)
    every = sorted(groups.values(), key=lambda g: tuple(str(x) for x in g.key))
    return [g for g in every if g.task != LM_TASK], [g for g in every if g.task == LM_TASK]


@dataclass
class Row:
    """One line of the main table: a published number, or a group of measured runs."""

    task: str
    method: str
    source: str
    value: float | None = None  # a published row's accuracy, %
    group: Group | None = None


def _task_key(task: str) -> tuple:
    return (TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER)), task


def _group_key(g: Group) -> tuple:
    return str(g.protocol), str(g.base), str(g.gate), g.adapter


def build_rows(groups: list[Group]) -> list[Row]:
    """Per task: each published row followed by the groups reproducing it, then the groups with no counterpart."""
    rows: list[Row] = []
    tasks = sorted({g.task for g in groups} | set(PUBLISHED), key=_task_key)
    for task in tasks:
        mine = [g for g in groups if g.task == task]
        for key in COUNTERPART_ORDER:
            if key not in PUBLISHED.get(task, {}):
                continue
            method, value = PUBLISHED[task][key]
            rows.append(Row(task, method, PUBLISHED_LABEL, value=value))
            for g in sorted((g for g in mine if g.counterpart == key), key=_group_key):
                rows.append(Row(task, g.method, MEASURED_LABEL, group=g))
        for g in sorted((g for g in mine if g.counterpart is None), key=_group_key):
            rows.append(Row(task, g.method, MEASURED_LABEL, group=g))
    return rows


# --------------------------------------------------------------------------------------------- markdown


def base_text(g: Group) -> str:
    """``pretrained NAME.pth (fingerprint)`` / ``scratch (preset)`` / ``–``."""
    if g.base is None:
        return DASH
    if g.kind == "scratch":
        preset = g.base.partition(":")[2]
        return f"scratch ({preset})" if preset else "scratch"
    prints = g.fingerprints()
    return f"pretrained {Path(g.base).name}" + (f" ({', '.join(prints)})" if prints else "")


def format_accuracy(g: Group) -> str:
    """``mean ± std`` with two decimals (std over seeds, n - 1); a single seed has no std."""
    accs = g.accuracies
    std = f"{statistics.stdev(accs):.2f}" if len(accs) > 1 else DASH
    return f"{statistics.fmean(accs):.2f} ± {std}"


def wilson_text(g: Group) -> str:
    cells = [f"seed {seed}: {lo:.2f}–{hi:.2f} (n = {n})" for seed, n, (lo, hi) in g.wilson()]
    return "; ".join(cells) if cells else DASH


def seed_interval_text(g: Group) -> str:
    interval = g.seed_interval()
    return DASH if interval is None else f"{interval[0]:.2f}–{interval[1]:.2f} (n = {len(g.runs)} seeds)"


def comparison_text(g: Group) -> str:
    """Whether the published value lies inside each interval, or why there is no published value."""
    published = g.published
    if published is None:
        return g.no_counterpart_reason()
    parts = []
    interval = g.seed_interval()
    if interval is not None:
        parts.append(f"seeds: {verdict(published, interval)}")
    per_run = [verdict(published, iv) for _, _, iv in g.wilson()]
    if per_run:
        inside = per_run.count(INSIDE)
        if inside == len(per_run):
            text = INSIDE
        elif inside == 0:
            text = OUTSIDE
        else:
            text = f"{INSIDE} of {inside} of {len(per_run)} runs"
        parts.append(f"test texts: {text}")
    return "; ".join(parts) if parts else "no interval (one seed, no test size)"


def _fraction_or_percent(value: float | None) -> str:
    if value is None:
        return DASH
    return f"{100 * value:.2f}" if value <= 1.0 else f"{value:.2f}"


def _params(g: Group) -> str:
    trainable, total = g.mean("trainable_params"), g.mean("total_params")
    if trainable is None:
        return DASH
    text = f"{trainable:,.0f}"
    return f"{text} ({100 * trainable / total:.2f} %)" if total else text


def _plain(value: float | None, digits: int) -> str:
    return DASH if value is None else f"{value:,.{digits}f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


HEADER = [
    "Task", "Method", "Source", "Protocol", "Base", "Gate", "Seeds", "Test acc. (%)",
    "95 % CI, test texts (Wilson)", "95 % CI, seeds (t)", "Published (%)", "Published vs 95 % CI",
    "Val acc. (%)", "Sparsity (%)", "Trainable params", "Time / epoch (s)", "Peak memory (MB)",
]  # fmt: skip


def row_cells(r: Row) -> list[str]:
    """The main table's cells of one row."""
    if r.group is None:
        rest = [DASH] * (len(HEADER) - 8)
        return [r.task, r.method, f"{PUBLISHED_LABEL} ({PUBLISHED_SOURCE})", *[DASH] * 4, f"{r.value:.2f}", *rest]
    g = r.group
    published = g.published
    return [
        r.task,
        r.method,
        MEASURED_LABEL,
        g.protocol or DASH,
        base_text(g),
        g.gate or DASH,
        str(len(g.runs)),
        format_accuracy(g),
        wilson_text(g),
        seed_interval_text(g),
        DASH if published is None else f"{published:.2f}",
        comparison_text(g),
        _fraction_or_percent(g.mean("val_accuracy")),
        _fraction_or_percent(g.mean("test_sparsity", "sparsity")),
        _params(g),
        _plain(g.mean("epoch_time_s"), 1),
        _plain(g.mean("peak_memory_mb"), 0),
    ]


def _mean_std(values: list[float], digits: int) -> str:
    if not values:
        return DASH
    std = f"{statistics.stdev(values):.{digits}f}" if len(values) > 1 else DASH
    return f"{statistics.fmean(values):.{digits}f} ± {std}"


def markdown(rows: list[Row], lm_groups: list[Group], runs_dir: Path, n_runs: int) -> str:
    lines = [
        "# SpikeGPT fine-tuning: full fine-tuning vs LoRA vs SpikeLoRA",
        "",
        f"{n_runs} run(s) found under `{runs_dir}`, grouped by task, adapter, protocol, base and gate. Rows marked "
        f"**{MEASURED_LABEL}** are the runs' `metrics.json`, each placed under the published row it reproduces "
        f"(rows marked **{PUBLISHED_LABEL}**: the {PUBLISHED_SOURCE}, Subj; not measured here). Test accuracy is "
        "the mean ± sample standard deviation (n - 1) over seeds. Two 95 % intervals: per run, binomial over its "
        "n test texts (Wilson score interval); over seeds, mean ± t(0.975, n - 1) · s / √n. The other columns "
        "are means over seeds. A pretrained base is named with the first 12 hex digits of its fingerprint.",
        "",
    ]
    lines += _table(HEADER, [row_cells(r) for r in rows])
    lines += [
        "",
        "## SpikeGPT paper: NLU results",
        "",
        f"Listed for reference, not placed beside the runs: {SPIKEGPT_NLU_SOURCE}.",
        "",
    ]
    lines += _table(
        ["Task", "Model", "Test acc. (%)", "Source"],
        [[task, model, f"{acc:.2f}", SPIKEGPT_NLU_SOURCE] for task, model, acc in SPIKEGPT_NLU],
    )
    if lm_groups:
        lines += ["", "## Language-model runs", "", "Means ± sample standard deviation over seeds.", ""]
        lines += _table(
            ["Adapter", "Protocol", "Base", "Seeds", "Test loss", "Test perplexity", "Test bits / byte"],
            [
                [
                    g.adapter,
                    g.protocol or DASH,
                    base_text(g),
                    str(len(g.runs)),
                    _mean_std(g.values("test_loss"), 4),
                    _mean_std(g.values("test_ppl"), 2),
                    _mean_std(g.values("test_bpb"), 4),
                ]
                for g in lm_groups
            ],
        )
    lines += ["", "![accuracy per task and method](report.png)", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- chart


def _error_bar(r: Row) -> tuple[float, float, float]:
    """(value, below, above) of a row's bar: the seed interval, else a single run's Wilson interval."""
    if r.group is None:
        return r.value, 0.0, 0.0
    accs = r.group.accuracies
    mean = statistics.fmean(accs)
    interval = r.group.seed_interval()
    if interval is None and (wilson := r.group.wilson()):
        interval = wilson[0][2]
    if interval is None:
        return mean, 0.0, 0.0
    return mean, max(0.0, mean - interval[0]), max(0.0, interval[1] - mean)


def chart(rows: list[Row], path: Path) -> None:
    """Bar chart of test accuracy per task: measured (95 % error bars) beside published (hatched)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    tasks = list(dict.fromkeys(r.task for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(5.0, 4.5 * len(tasks)), 4.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        task_rows = [r for r in rows if r.task == task]
        labels = [
            f"{r.method}\n(published)"
            if r.group is None
            else f"{r.method}\n({base_kind(r.group.base)}, {r.group.protocol or DASH}"
            + (f", {r.group.gate})" if r.group.gate else ")")
            for r in task_rows
        ]
        bars_data = [_error_bar(r) for r in task_rows]
        means = [b[0] for b in bars_data]
        errors = [[b[1] for b in bars_data], [b[2] for b in bars_data]]
        colors = ["#bbbbbb" if r.group is None else "#1f77b4" for r in task_rows]
        bars = ax.bar(range(len(task_rows)), means, yerr=errors, capsize=4, color=colors, edgecolor="black")
        for bar, r, (_, _, above) in zip(bars, task_rows, bars_data, strict=True):
            if r.group is None:
                bar.set_hatch("//")
            ax.annotate(f"{bar.get_height():.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height() + above),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")  # fmt: skip
        ax.set_xticks(range(len(task_rows)), labels, rotation=45, ha="right", fontsize=6)
        ax.set_xlim(-0.6, max(len(task_rows), 3) - 0.4)  # a lone bar keeps a normal width
        low = min(m - e for m, e in zip(means, errors[0], strict=True))
        ax.set_ylim(max(0.0, math.floor(low / 5) * 5 - 5), 100)
        ax.set_title(task)
        ax.set_ylabel("test accuracy (%)")
    fig.legend(
        handles=[
            Patch(facecolor="#1f77b4", edgecolor="black", label="measured here (95 % interval)"),
            Patch(facecolor="#bbbbbb", edgecolor="black", hatch="//", label=f"published ({PUBLISHED_SOURCE})"),
        ],
        loc="upper center",
        ncol=2,
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- CLI


def write_report(runs_dir: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.png`` into ``out_dir`` (default ``runs_dir``); returns their paths."""
    runs_dir = Path(runs_dir)
    runs = find_runs(runs_dir)
    groups, lm_groups = group_runs(runs)
    rows = build_rows(groups)
    out = Path(out_dir) if out_dir is not None else runs_dir
    out.mkdir(parents=True, exist_ok=True)
    md, png = out / "report.md", out / "report.png"
    md.write_text(markdown(rows, lm_groups, runs_dir, len(runs)), encoding="utf-8")
    chart(rows, png)
    return md, png


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spikegpt-ft report", description=__doc__.split("\n")[0])
    parser.add_argument("runs_dir", help="directory searched recursively for metrics.json")
    parser.add_argument("--out", help="where report.md and report.png go (default: RUNS_DIR)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        md, png = write_report(args.runs_dir, args.out)
    except (ReportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
