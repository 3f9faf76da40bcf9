"""Aggregate outputs of the data-efficiency experiments: results.csv, results.md and plots.

The experiment runner produces one JSON-able row per (method, label fraction, repetition):

    {"method": "rpl", "fraction": 0.1, "repetition": 0, "num_labeled": 2,
     "metrics": {"WT": 0.81, "TC": 0.6, "ET": 0.5}}

This module turns a list of such rows into the paper's figures and tables: per method and label
fraction the mean over repetitions with a 95% confidence interval from the t distribution (the
original reported single runs, or means without any spread). NaN metric values (e.g. HD95 when a
region is absent from exactly one of prediction and truth) are skipped and counted, never averaged
in. Everything is written atomically (temporary file + `os.replace`) so that a run killed midway
never leaves a half-written report next to a finished one.
"""

from __future__ import annotations

import csv
import logging
import math
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

from ssl3d_jax.fileio import atomic_write

logger = logging.getLogger(__name__)

# Columns every row has, in this order, in results.csv.
BASE_COLUMNS = ("method", "fraction", "repetition", "num_labeled")

# Metric names (lower-cased) that end with one of these are better when smaller: the bold "best"
# cell of results.md is then the smallest mean.
LOWER_IS_BETTER_SUFFIXES = ("hd95", "hausdorff", "loss", "error")


# ------------------------------------------------------------------------------------------------
# Helpers.


def _validate_rows(rows: Sequence[Mapping]) -> list[Mapping]:
    rows = list(rows)
    for i, row in enumerate(rows):
        missing = [k for k in ("method", "fraction", "repetition", "metrics") if k not in row]
        if missing:
            raise ValueError(f"report: row {i} lacks key(s) {missing}; got {sorted(row)}")
        if not isinstance(row["metrics"], Mapping):
            raise ValueError(f"report: row {i} 'metrics' must be a dict of metric -> float")
        if not 0.0 < float(row["fraction"]) <= 1.0:
            raise ValueError(f"report: row {i} fraction {row['fraction']} is not in (0, 1]")
    return rows


def _metric_names(rows: Sequence[Mapping]) -> list[str]:
    return sorted({str(m) for row in rows for m in row["metrics"]})


def _methods(rows: Sequence[Mapping]) -> list[str]:
    # Order of first appearance: the runner decides (e.g. pretrained methods, then "scratch").
    return list(dict.fromkeys(str(row["method"]) for row in rows))


def _fractions(rows: Sequence[Mapping]) -> list[float]:
    return sorted({float(row["fraction"]) for row in rows})


def _as_float(value) -> float:
    """Metric value -> float; None becomes nan (a missing score counts like an undefined one)."""
    return float("nan") if value is None else float(value)


def format_fraction(fraction: float) -> str:
    """0.1 -> '10%', 0.025 -> '2.5%', 1.0 -> '100%'."""
    return f"{100.0 * float(fraction):.6g}%"


def lower_is_better(metric: str) -> bool:
    """Whether smaller values of `metric` are better (HD95, losses, errors)."""
    return str(metric).lower().endswith(LOWER_IS_BETTER_SUFFIXES)


# ------------------------------------------------------------------------------------------------
# results.csv


def write_results_csv(rows: Sequence[Mapping], path) -> pathlib.Path:
    """Write one line per row: method, fraction, repetition, num_labeled, one column per metric.

    Metric columns are sorted by name. A metric missing from a row is an empty cell; NaN is 'nan';
    floats are written in their shortest exact form. Rows keep the order given. Other top-level
    keys of the rows are not written (they stay in the runner's per-run JSON).

    Args:
      rows: result rows as in the module docstring.
      path: output file; written atomically.

    Returns:
      `path` as a `pathlib.Path`.
    """
    rows = _validate_rows(rows)
    metrics = _metric_names(rows)
    clash = set(metrics) & set(BASE_COLUMNS)
    if clash:
        raise ValueError(
            f"write_results_csv: metric names {sorted(clash)} clash with {BASE_COLUMNS}"
        )

    def write(f):
        w = csv.writer(f, lineterminator="\n")
        w.writerow([*BASE_COLUMNS, *metrics])
        for row in rows:
            line = [
                str(row["method"]),
                repr(float(row["fraction"])),
                str(int(row["repetition"])),
                "" if row.get("num_labeled") is None else str(int(row["num_labeled"])),
            ]
            for m in metrics:
                value = row["metrics"].get(m)
                line.append("" if value is None else repr(float(value)))
            w.writerow(line)

    return atomic_write(path, write)


def read_results_csv(path) -> list[dict]:
    """Read a `write_results_csv` file back into rows.

    Returns:
      list of {"method": str, "fraction": float, "repetition": int, "num_labeled": int | None,
      "metrics": {name: float}}; empty metric cells are left out.
    """
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        if tuple(header[: len(BASE_COLUMNS)]) != BASE_COLUMNS:
            raise ValueError(f"read_results_csv: {path} does not start with columns {BASE_COLUMNS}")
        metrics = header[len(BASE_COLUMNS) :]
        rows = []
        for line in reader:
            cell = dict(zip(header, line, strict=True))
            rows.append(
                {
                    "method": cell["method"],
                    "fraction": float(cell["fraction"]),
                    "repetition": int(cell["repetition"]),
                    "num_labeled": int(cell["num_labeled"]) if cell["num_labeled"] else None,
                    "metrics": {m: float(cell[m]) for m in metrics if cell[m] != ""},
                }
            )
    return rows


# ------------------------------------------------------------------------------------------------
# Summary statistics.


def summarize(rows: Sequence[Mapping]) -> list[dict]:
    """Mean and 95% CI per method × label fraction × metric, over repetitions.

    Returns:
      list of dicts, methods in order of first appearance, then fraction ascending, then metric
      name sorted, with keys:
        method, fraction, metric,
        n: number of finite values used,
        n_nan: number of NaN (or None) values skipped,
        mean, std (sample, ddof=1; None for n < 2), min, max: None when n == 0,
        ci95: half-width t.ppf(0.975, n - 1) · std / √n; None when n < 2,
        num_labeled: the rows' num_labeled when they agree, else None.
    """
    rows = _validate_rows(rows)
    groups: dict[tuple[str, float, str], list[float]] = {}
    labeled: dict[tuple[str, float], set] = {}
    for row in rows:
        key = (str(row["method"]), float(row["fraction"]))
        labeled.setdefault(key, set()).add(row.get("num_labeled"))
        for metric, value in row["metrics"].items():
            groups.setdefault((*key, str(metric)), []).append(_as_float(value))

    order = {m: i for i, m in enumerate(_methods(rows))}
    out = []
    for method, fraction, metric in sorted(groups, key=lambda k: (order[k[0]], k[1], k[2])):
        values = np.asarray(groups[method, fraction, metric], np.float64)
        finite = values[~np.isnan(values)]
        n = int(finite.size)
        entry = {
            "method": method,
            "fraction": fraction,
            "metric": metric,
            "n": n,
            "n_nan": int(values.size - n),
            "mean": None,
            "std": None,
            "ci95": None,
            "min": None,
            "max": None,
        }
        if n:
            entry.update(
                mean=float(finite.mean()), min=float(finite.min()), max=float(finite.max())
            )
        if n >= 2:
            std = float(finite.std(ddof=1))
            entry.update(std=std, ci95=float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)))
        nl = labeled[method, fraction]
        entry["num_labeled"] = next(iter(nl)) if len(nl) == 1 else None
        out.append(entry)
    return out


# ------------------------------------------------------------------------------------------------
# results.md


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def _cell(entry: Mapping | None, digits: int) -> tuple[str, str | None]:
    """Cell text and the rounded mean used to pick the best cell (None: no mean)."""
    if entry is None:
        return "–", None
    skipped = f", {entry['n_nan']} NaN skipped" if entry["n_nan"] else ""
    if entry["n"] == 0:
        return f"n/a (n=0{skipped})", None
    mean = f"{entry['mean']:.{digits}f}"
    if entry["ci95"] is None:
        return f"{mean} (n={entry['n']}{skipped})", mean
    return f"{mean} ± {entry['ci95']:.{digits}f} (n={entry['n']}{skipped})", mean


def results_markdown(
    rows: Sequence[Mapping],
    *,
    title: str,
    notes: str = "",
    metrics: Sequence[str] | None = None,
    digits: int = 3,
) -> str:
    """The text of `write_results_md` (see there)."""
    rows = _validate_rows(rows)
    metrics = list(metrics) if metrics is not None else _metric_names(rows)
    summary = {(e["method"], e["fraction"], e["metric"]): e for e in summarize(rows)}
    methods, fractions = _methods(rows), _fractions(rows)

    lines = [f"# {title}", ""]
    lines.append(
        "Cells: mean ± 95% confidence half-width (t distribution) over repetitions, with the "
        "number of repetitions n; best mean per column in bold "
        "(lowest for distances and losses, highest otherwise). NaN values (e.g. HD95 with the "
        "region absent from exactly one of prediction and truth) are skipped and counted."
    )
    per_fraction = {}
    for f in fractions:
        counts = {e["num_labeled"] for k, e in summary.items() if k[1] == f}
        counts.discard(None)
        if len(counts) == 1:
            per_fraction[f] = counts.pop()
    if per_fraction:
        lines += [
            "",
            "Labelled training cases: "
            + ", ".join(f"{format_fraction(f)} → {n}" for f, n in per_fraction.items())
            + ".",
        ]

    for metric in metrics:
        lines += ["", f"## {_md_escape(metric)}", ""]
        lines.append("| method | " + " | ".join(format_fraction(f) for f in fractions) + " |")
        lines.append("|---|" + "---:|" * len(fractions))
        cells = {
            (m, f): _cell(summary.get((m, f, metric)), digits) for m in methods for f in fractions
        }
        pick = min if lower_is_better(metric) else max
        best = {}
        for f in fractions:
            means = [float(c[1]) for m in methods if (c := cells[m, f])[1] is not None]
            if means:
                best[f] = pick(means)
        for m in methods:
            texts = []
            for f in fractions:
                text, mean = cells[m, f]
                if mean is not None and float(mean) == best[f]:
                    text = f"**{text}**"
                texts.append(text)
            lines.append(f"| {_md_escape(m)} | " + " | ".join(texts) + " |")

    if notes:
        lines += ["", notes.strip()]
    return "\n".join(lines) + "\n"


def write_results_md(
    rows: Sequence[Mapping],
    path,
    *,
    title: str,
    notes: str = "",
    metrics: Sequence[str] | None = None,
) -> pathlib.Path:
    """Write a Markdown report: one table per metric, then `notes`.

    Each table has one row per method (order of first appearance) and one column per label
    fraction (as %); a cell reads "0.812 ± 0.031 (n=3)", "0.812 (n=1)" for a single repetition,
    "–" where the method was not run, and mentions skipped NaNs. The best mean per column is bold
    (compared at the displayed precision, so ties are all bold).

    Args:
      rows: result rows as in the module docstring.
      path: output file; written atomically.
      title: level-1 heading.
      notes: Markdown appended at the end (e.g. dataset, config, deviations).
      metrics: metric names and their order; None → every metric of the rows, sorted.

    Returns:
      `path` as a `pathlib.Path`.
    """
    text = results_markdown(rows, title=title, notes=notes, metrics=metrics)
    return atomic_write(path, lambda f: f.write(text))


# ------------------------------------------------------------------------------------------------
# Plots.


def plot_results(rows: Sequence[Mapping], path, *, metric: str, title: str) -> pathlib.Path:
    """Draw mean `metric` vs label fraction, one line per method with 95% CI error bars, as PNG.

    The x axis is the label fraction in %, logarithmic when the fractions span more than 10×
    (the paper's 1%…100% splits), with ticks at the fractions. "scratch" methods (no pretraining)
    are dashed. Uses matplotlib's Agg canvas directly, never pyplot, so no display is needed and
    no global backend is changed.

    Args:
      rows: result rows as in the module docstring.
      path: output PNG; written atomically.
      metric: metric name to plot.
      title: figure title.

    Returns:
      `path` as a `pathlib.Path`.

    Raises:
      ValueError when no row has `metric`.
    """
    # Imported here: only report writing needs matplotlib, and it costs ~0.5 s to import.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    rows = _validate_rows(rows)
    available = _metric_names(rows)
    if metric not in available:
        raise ValueError(f"plot_results: no row has metric {metric!r}; rows have {available}")
    entries = [e for e in summarize(rows) if e["metric"] == metric]
    fractions = _fractions(rows)
    methods = _methods(rows)

    log_x = fractions[-1] / fractions[0] > 10.0
    plotted = [m for m in methods if any(e["method"] == m and e["n"] > 0 for e in entries)]
    span = 100.0 * (fractions[-1] - fractions[0]) or 1.0

    def dodge(x: float, i: int) -> float:
        # Shift methods slightly apart along x so that error bars at one fraction don't overlap.
        step = i - (len(plotted) - 1) / 2
        return x * 10.0 ** (0.012 * step) if log_x else x + 0.006 * span * step

    fig = Figure(figsize=(7.5, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    drawn = 0
    for i, method in enumerate(plotted):
        pts = [e for e in entries if e["method"] == method and e["n"] > 0]
        x = [dodge(100.0 * e["fraction"], i) for e in pts]
        y = [e["mean"] for e in pts]
        err = [0.0 if e["ci95"] is None else e["ci95"] for e in pts]
        ax.errorbar(
            x,
            y,
            yerr=err,
            label=method,
            marker="o",
            markersize=4,
            capsize=3,
            linestyle="--" if method.startswith("scratch") else "-",
        )
        drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, f"no finite values of {metric}", ha="center", transform=ax.transAxes)
    if log_x:
        ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator([100.0 * f for f in fractions]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([format_fraction(f) for f in fractions])
    ax.set_xlabel("labelled training cases (% of the training set)")
    ax.set_ylabel(metric + (" (lower is better)" if lower_is_better(metric) else ""))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if drawn:
        if drawn > 4:
            ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
        else:
            ax.legend(loc="best")
    fig.tight_layout()
    return atomic_write(path, lambda f: fig.savefig(f, format="png"), binary=True)


# ------------------------------------------------------------------------------------------------
# Everything at once.


def _safe_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(metric))


def write_report(
    rows: Sequence[Mapping],
    out_dir,
    *,
    metrics: Iterable[str],
    title: str,
    notes: str = "",
) -> dict[str, pathlib.Path]:
    """Write results.csv, results.md and one `results_<metric>.png` per metric into `out_dir`.

    Args:
      rows: result rows as in the module docstring.
      out_dir: output folder (created).
      metrics: metrics to plot; they come first in results.md, followed by any other metric of
        the rows.
      title: title of results.md and of the plots.
      notes: Markdown appended to results.md.

    Returns:
      {"csv": path, "md": path, "png_<metric>": path for each metric}.

    Raises:
      ValueError naming the metrics that no row has.
    """
    rows = _validate_rows(rows)
    metrics = list(dict.fromkeys(metrics))
    available = _metric_names(rows)
    missing = [m for m in metrics if m not in available]
    if missing:
        raise ValueError(f"write_report: no row has metric(s) {missing}; rows have {available}")
    out_dir = pathlib.Path(out_dir)
    out = {
        "csv": write_results_csv(rows, out_dir / "results.csv"),
        "md": write_results_md(
            rows,
            out_dir / "results.md",
            title=title,
            notes=notes,
            metrics=metrics + [m for m in available if m not in metrics],
        ),
    }
    for metric in metrics:
        out[f"png_{metric}"] = plot_results(
            rows,
            out_dir / f"results_{_safe_name(metric)}.png",
            metric=metric,
            title=f"{title}: {metric}",
        )
    logger.info("wrote report to %s", out_dir)
    return out
