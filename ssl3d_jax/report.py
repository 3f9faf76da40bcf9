"""Aggregate outputs of the data-efficiency experiments: results.csv, results.md and plots.

The experiment runner produces one JSON-able row per (method, label fraction, repetition):

    {"method": "rpl", "fraction": 0.1, "repetition": 0, "num_labeled": 2,
     "metrics": {"WT": 0.81, "TC": 0.6, "ET": 0.5},
     "per_case": {"case_07": {"WT": 0.84, "TC": 0.7, "ET": 0.4}, ...}}   # optional

`per_case` (the test scores of each case, a run's `dice_per_case`) makes the comparisons paired:
`paired_differences` compares each method with a baseline ('scratch', 'random_warmup') case by
case, paired by (repetition, test case), with a bootstrap CI (`bootstrap_mean_ci`); the test cases
must be the same in every repetition (the experiment runner keeps them fixed).

This module turns a list of such rows into the paper's figures and tables: per method and label
fraction the mean over repetitions with a 95% confidence interval from the t distribution in the
tables (the original reported single runs, or means without any spread), the mean over
(repetition, test case) with a bootstrap 95% CI in the plots, and the paired differences against
the baselines (results_paired.csv, a section of results.md, results_paired_<metric>.png). NaN
metric values (e.g. HD95 when a region is absent from both prediction and truth in every test
case) are skipped and counted, never averaged in (in paired comparisons they are dropped pairwise
and counted). Everything is written atomically (temporary file + `os.replace`) so that a run
killed midway never leaves a half-written report next to a finished one.
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
# Columns of results_paired.csv (`write_paired_csv`), in this order.
PAIRED_COLUMNS = (
    "method",
    "baseline",
    "fraction",
    "metric",
    "mean_diff",
    "ci_low",
    "ci_high",
    "n_cases",
    "n_repetitions",
    "n_pairs",
    "n_dropped",
    "resolved",
    "lower_is_better",
)
# Methods that the others are compared with, when present: training from scratch, and the same
# frozen warm-up as the pretrained arm from a random encoder.
DEFAULT_BASELINES = ("scratch", "random_warmup")
NUM_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0

# Metric names (lower-cased) that end with one of these, or have one as a word ("HD95 WT", the
# finetuning's name, or "WT_hd95"), are better when smaller: the bold "best" cell of results.md
# is then the smallest mean, and a negative paired difference favours the method.
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
        per_case = row.get("per_case")
        if per_case is not None and not (
            isinstance(per_case, Mapping) and all(isinstance(v, Mapping) for v in per_case.values())
        ):
            raise ValueError(f"report: row {i} 'per_case' must be a dict case -> {{metric: float}}")
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
    name = str(metric).lower()
    words = set(re.split(r"[^a-z0-9]+", name))
    return name.endswith(LOWER_IS_BETTER_SUFFIXES) or bool(words & set(LOWER_IS_BETTER_SUFFIXES))


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
# Bootstrap over (repetition, test case) and paired differences.


def bootstrap_mean_ci(
    values,
    *,
    num_resamples: int = NUM_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = 0.95,
) -> dict | None:
    """Mean of a [repetitions, cases] table and its bootstrap CI (a two-way "pigeonhole" bootstrap).

    The test cases are the same in every repetition, so repetitions and cases are crossed random
    factors (Owen 2007, "The pigeonhole bootstrap", Ann. Appl. Stat.): each resample draws R
    repetitions and, independently, C cases with replacement, keeps every (drawn repetition,
    drawn case) cell (a case drawn k times and a repetition drawn l times weigh k·l) and recomputes
    the mean over those cells; the CI is the percentile interval of `num_resamples` such means.
    Sampling cases jointly across repetitions keeps each case's correlation across repetitions
    (the same scan is easy or hard for every seed); sampling repetitions covers the seeds'
    (pretraining, finetuning, labelled subset) variance. With one repetition it is the ordinary
    bootstrap over cases. Vectorised: the weights are multinomial counts, the resampled means two
    matrix products.

    Args:
      values: `[R, C]` (or `[C]`: one repetition) floats; NaN cells (undefined scores, unpaired
        cases) are left out of every mean; rows / columns without a finite value are dropped.
      num_resamples: bootstrap resamples.
      seed: seed of `np.random.default_rng` (the same table gives the same CI).
      confidence: coverage of the interval.

    Returns:
      None when no value is finite, else {'mean' (over the finite cells), 'low', 'high',
      'n_repetitions', 'n_cases', 'n_values' (finite cells)}.
    """
    v = np.asarray(values, np.float64)
    if v.ndim == 1:
        v = v[None]
    if v.ndim != 2:
        raise ValueError(f"bootstrap_mean_ci: expected a [repetitions, cases] table, got {v.shape}")
    mask = np.isfinite(v)
    v, mask = v[mask.any(1)][:, mask.any(0)], mask[mask.any(1)][:, mask.any(0)]
    if not mask.any():
        return None
    r, c = v.shape
    v0 = np.where(mask, v, 0.0)
    m = mask.astype(np.float64)
    rng = np.random.default_rng(seed)
    w_rep = rng.multinomial(r, np.full(r, 1.0 / r), size=num_resamples).astype(np.float64)
    w_case = rng.multinomial(c, np.full(c, 1.0 / c), size=num_resamples).astype(np.float64)
    total = np.einsum("bc,bc->b", w_rep @ v0, w_case)
    count = np.einsum("bc,bc->b", w_rep @ m, w_case)
    ok = count > 0  # a resample of only NaN cells has no mean: left out
    means = total[ok] / count[ok]
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return {
        "mean": float(v0.sum() / m.sum()),
        "low": float(low),
        "high": float(high),
        "n_repetitions": int(r),
        "n_cases": int(c),
        "n_values": int(m.sum()),
    }


def _per_case_index(rows: Sequence[Mapping]) -> dict[tuple[str, float], dict[int, Mapping]]:
    """{(method, fraction): {repetition: per_case}} of the rows that carry `per_case`."""
    out: dict[tuple[str, float], dict[int, Mapping]] = {}
    for row in rows:
        if row.get("per_case") is None:
            continue
        by_rep = out.setdefault((str(row["method"]), float(row["fraction"])), {})
        rep = int(row["repetition"])
        if rep in by_rep:
            raise ValueError(
                f"report: two rows of method {row['method']!r}, fraction {row['fraction']}, "
                f"repetition {rep}"
            )
        by_rep[rep] = row["per_case"]
    return out


def _case_metrics(by_rep: Mapping[int, Mapping]) -> set[str]:
    return {str(k) for per_case in by_rep.values() for scores in per_case.values() for k in scores}


def _score(scores: Mapping | None, metric: str) -> float:
    return float("nan") if scores is None else _as_float(scores.get(metric))


def paired_differences(
    rows: Sequence[Mapping],
    *,
    baselines: Sequence[str] = DEFAULT_BASELINES,
    metrics: Sequence[str] | None = None,
    num_resamples: int = NUM_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = 0.95,
) -> list[dict]:
    """Per-case differences (method − baseline) of every method against every present baseline.

    For each baseline of `baselines` that the rows have, each other method, each label fraction
    and each metric: the differences `method − baseline` of the per-case scores, paired by
    (repetition, test case) (the same labelled subset, seed and test scan); pairs where either
    score is NaN or missing are dropped and counted. The mean difference is the mean over the
    remaining pairs; its CI comes from `bootstrap_mean_ci` (two-way bootstrap over repetitions
    and cases). Only rows with `per_case` take part; the order of rows and of cases within a row
    does not matter.

    Returns:
      list of dicts with the keys of `PAIRED_COLUMNS`: method, baseline, fraction, metric,
      mean_diff, ci_low, ci_high (None when no pair is finite), n_cases, n_repetitions (that
      contribute a finite pair), n_pairs (finite pairs), n_dropped (pairs dropped for a NaN),
      resolved (the CI excludes 0), lower_is_better (the metric's direction: for such metrics a
      negative difference favours the method). Ordered by baseline, method (first appearance),
      fraction, metric.
    """
    rows = _validate_rows(rows)
    index = _per_case_index(rows)
    methods = _methods(rows)
    out = []
    for baseline in [b for b in baselines if b in methods]:
        for method in methods:
            if method == baseline:
                continue
            for fraction in _fractions(rows):
                ours, theirs = index.get((method, fraction)), index.get((baseline, fraction))
                if not ours or not theirs:
                    continue
                reps = sorted(set(ours) & set(theirs))
                cases = sorted({c for r in reps for c in set(ours[r]) & set(theirs[r])})
                if not reps or not cases:
                    continue
                names = _case_metrics(ours) & _case_metrics(theirs)
                for metric in [m for m in metrics if m in names] if metrics else sorted(names):
                    diff = np.full((len(reps), len(cases)), np.nan)
                    n_pairs = 0
                    for i, r in enumerate(reps):
                        for j, c in enumerate(cases):
                            if c in ours[r] and c in theirs[r]:
                                n_pairs += 1
                                diff[i, j] = _score(ours[r][c], metric) - _score(
                                    theirs[r][c], metric
                                )
                    ci = bootstrap_mean_ci(
                        diff, num_resamples=num_resamples, seed=seed, confidence=confidence
                    )
                    entry = {
                        "method": method,
                        "baseline": baseline,
                        "fraction": fraction,
                        "metric": metric,
                        "mean_diff": None,
                        "ci_low": None,
                        "ci_high": None,
                        "n_cases": 0,
                        "n_repetitions": 0,
                        "n_pairs": 0,
                        "n_dropped": int(n_pairs - np.isfinite(diff).sum()),
                        "resolved": False,
                        "lower_is_better": lower_is_better(metric),
                    }
                    if ci is not None:
                        entry.update(
                            mean_diff=ci["mean"],
                            ci_low=ci["low"],
                            ci_high=ci["high"],
                            n_cases=ci["n_cases"],
                            n_repetitions=ci["n_repetitions"],
                            n_pairs=ci["n_values"],
                            resolved=bool(ci["low"] > 0.0 or ci["high"] < 0.0),
                        )
                    out.append(entry)
    return out


def bootstrap_summary(
    rows: Sequence[Mapping],
    metric: str,
    *,
    num_resamples: int = NUM_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[tuple[str, float], dict]:
    """{(method, fraction): `bootstrap_mean_ci` of the per-case scores of `metric` over
    (repetition, test case)}, for the (method, fraction) groups whose rows all carry `per_case`
    with some finite value of `metric`."""
    rows = _validate_rows(rows)
    index = _per_case_index(rows)
    counts: dict[tuple[str, float], int] = {}
    for row in rows:
        key = (str(row["method"]), float(row["fraction"]))
        counts[key] = counts.get(key, 0) + 1
    out = {}
    for key, by_rep in index.items():
        if len(by_rep) != counts[key]:
            continue  # some repetitions without per-case scores: no joint bootstrap
        reps = sorted(by_rep)
        cases = sorted({c for r in reps for c in by_rep[r]})
        table = np.array(
            [[_score(by_rep[r].get(c), metric) for c in cases] for r in reps], np.float64
        )
        ci = bootstrap_mean_ci(table, num_resamples=num_resamples, seed=seed)
        if ci is not None:
            out[key] = ci
    return out


def write_paired_csv(paired: Sequence[Mapping], path) -> pathlib.Path:
    """Write `paired_differences` entries, one line each, columns `PAIRED_COLUMNS`; None is an
    empty cell, booleans 'true' / 'false', floats in their shortest exact form."""

    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, bool | np.bool_):
            return "true" if value else "false"
        if isinstance(value, float):
            return repr(float(value))
        return str(value)

    def write(f):
        w = csv.writer(f, lineterminator="\n")
        w.writerow(PAIRED_COLUMNS)
        for entry in paired:
            w.writerow([cell(entry[k]) for k in PAIRED_COLUMNS])

    return atomic_write(path, write)


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


def _paired_cell(entry: Mapping | None, digits: int) -> str:
    if entry is None:
        return "–"
    dropped = f", {entry['n_dropped']} NaN pair(s) dropped" if entry["n_dropped"] else ""
    if entry["mean_diff"] is None:
        return f"n/a (no finite pair{dropped})"
    text = (
        f"{entry['mean_diff']:+.{digits}f} "
        f"[{entry['ci_low']:+.{digits}f}, {entry['ci_high']:+.{digits}f}]"
    )
    n = f"(n={entry['n_cases']}×{entry['n_repetitions']}{dropped})"
    return f"**{text}** {n}" if entry["resolved"] else f"{text} {n}, not resolved"


def paired_markdown(
    paired: Sequence[Mapping],
    *,
    metrics: Sequence[str] | None = None,
    digits: int = 3,
    num_resamples: int = NUM_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> str:
    """The "Paired differences" section of results.md: per metric and baseline, one row per
    method and one column per label fraction (see `write_results_md`)."""
    if not paired:
        return ""
    present = list(dict.fromkeys(e["metric"] for e in paired))
    metrics = [m for m in metrics if m in present] if metrics else present
    metrics += [m for m in present if m not in metrics]
    fractions = sorted({float(e["fraction"]) for e in paired})
    by_key = {(e["metric"], e["baseline"], e["method"], float(e["fraction"])): e for e in paired}
    lines = [
        "## Paired differences",
        "",
        "Per-case differences of the test scores, method − baseline, paired by (repetition, "
        "test case): the same labelled cases, seeds and test scan on both sides. Cell: mean "
        "difference [95% CI] (n = test cases × repetitions). CI: percentile interval of "
        f"{num_resamples} bootstrap resamples (seed {seed}) of a two-way bootstrap that draws "
        "the repetitions and, independently, the test cases with replacement (the test cases "
        "are the same in every repetition), and averages the differences over the drawn "
        "(repetition, case) pairs. **Bold**: the CI excludes 0; otherwise the difference is "
        "*not resolved* by this experiment. Pairs with a NaN score on either side (e.g. HD95 of "
        "a region absent from both prediction and truth) are dropped and counted.",
    ]
    for metric in metrics:
        better = (
            "lower is better: < 0 means the method is better"
            if lower_is_better(metric)
            else "higher is better: > 0 means the method is better"
        )
        for baseline in dict.fromkeys(e["baseline"] for e in paired if e["metric"] == metric):
            methods = list(
                dict.fromkeys(
                    e["method"]
                    for e in paired
                    if e["metric"] == metric and e["baseline"] == baseline
                )
            )
            lines += ["", f"### {_md_escape(metric)} vs {_md_escape(baseline)}", ""]
            header = f"{_md_escape(metric)}: method − {_md_escape(baseline)} ({better})"
            lines.append(
                f"| {header} | " + " | ".join(format_fraction(f) for f in fractions) + " |"
            )
            lines.append("|---|" + "---:|" * len(fractions))
            for m in methods:
                cells = [
                    _paired_cell(by_key.get((metric, baseline, m, f)), digits) for f in fractions
                ]
                lines.append(f"| {_md_escape(m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_markdown(
    rows: Sequence[Mapping],
    *,
    title: str,
    notes: str = "",
    metrics: Sequence[str] | None = None,
    digits: int = 3,
    paired: Sequence[Mapping] | None = None,
) -> str:
    """The text of `write_results_md` (see there)."""
    rows = _validate_rows(rows)
    if paired is None and any(row.get("per_case") is not None for row in rows):
        paired = paired_differences(rows, metrics=metrics)
    metrics = list(metrics) if metrics is not None else _metric_names(rows)
    summary = {(e["method"], e["fraction"], e["metric"]): e for e in summarize(rows)}
    methods, fractions = _methods(rows), _fractions(rows)

    lines = [f"# {title}", ""]
    lines.append(
        "Cells: mean ± 95% confidence half-width (t distribution) over repetitions, with the "
        "number of repetitions n; best mean per column in bold "
        "(lowest for distances and losses, highest otherwise). NaN values (e.g. HD95 with the "
        "region absent from both prediction and truth in every test case) are skipped and "
        "counted."
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

    section = paired_markdown(paired or [], metrics=metrics, digits=digits)
    if section:
        lines += ["", section]
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
    paired: Sequence[Mapping] | None = None,
) -> pathlib.Path:
    """Write a Markdown report: one table per metric, the paired differences, then `notes`.

    Each table has one row per method (order of first appearance) and one column per label
    fraction (as %); a cell reads "0.812 ± 0.031 (n=3)", "0.812 (n=1)" for a single repetition,
    "–" where the method was not run, and mentions skipped NaNs. The best mean per column is bold
    (compared at the displayed precision, so ties are all bold).

    Then, when rows carry `per_case` (or `paired` is given), a "Paired differences" section
    (`paired_markdown`): per metric and baseline a table of "+0.053 [+0.012, +0.094] (n=50×3)"
    cells, bold when the CI excludes 0, else followed by "not resolved"; the header says which
    sign favours the method (for HD95-like metrics a negative difference).

    Args:
      rows: result rows as in the module docstring.
      path: output file; written atomically.
      title: level-1 heading.
      notes: Markdown appended at the end (e.g. dataset, config, deviations).
      metrics: metric names and their order; None → every metric of the rows, sorted.
      paired: `paired_differences` of the rows; None → computed when rows carry `per_case`.

    Returns:
      `path` as a `pathlib.Path`.
    """
    text = results_markdown(rows, title=title, notes=notes, metrics=metrics, paired=paired)
    return atomic_write(path, lambda f: f.write(text))


# ------------------------------------------------------------------------------------------------
# Plots.


def method_colors(methods: Sequence[str]) -> dict[str, tuple]:
    """One distinct colour per method, in the given order: matplotlib's qualitative 'tab10' (up to
    10 methods) or 'tab20' (up to 20; cycles beyond)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


def _line_style(method: str) -> str:
    # Baselines (no pretrained encoder) dashed, probes dotted, finetuned pretrained encoders solid.
    if method.startswith(("scratch", "random")):
        return "--"
    return ":" if method.endswith("probe") else "-"


def _fraction_axis(ax, fractions: Sequence[float]) -> bool:
    """Label fraction axis in %, logarithmic when the fractions span more than 10×."""
    from matplotlib.ticker import FixedLocator, NullLocator

    log_x = fractions[-1] / fractions[0] > 10.0
    if log_x:
        ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator([100.0 * f for f in fractions]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([format_fraction(f) for f in fractions])
    ax.set_xlabel("labelled training cases (% of the training set)")
    return log_x


def _dodger(fractions: Sequence[float], n: int, log_x: bool):
    span = 100.0 * (fractions[-1] - fractions[0]) or 1.0

    def dodge(x: float, i: int) -> float:
        # Shift methods slightly apart along x so that error bars at one fraction don't overlap.
        step = i - (n - 1) / 2
        return x * 10.0 ** (0.012 * step) if log_x else x + 0.006 * span * step

    return dodge


def _legend(ax, drawn: int) -> None:
    if drawn > 4:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    elif drawn:
        ax.legend(loc="best")


def plot_results(
    rows: Sequence[Mapping],
    path,
    *,
    metric: str,
    title: str,
    num_resamples: int = NUM_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> pathlib.Path:
    """Draw mean `metric` vs label fraction, one line per method with 95% CI error bars, as PNG.

    Points and error bars: where the rows carry `per_case`, the mean over (repetition, test case)
    with its bootstrap 95% CI (`bootstrap_summary`); otherwise the mean over repetitions with the
    t interval of `summarize`. One colour per method (`method_colors`); baselines dashed, probes
    dotted. The x axis is the label fraction in %, logarithmic when the fractions span more than
    10× (the paper's 1%…100% splits), with ticks at the fractions. Uses matplotlib's Agg canvas
    directly, never pyplot, so no display is needed and no global backend is changed.

    Args:
      rows: result rows as in the module docstring.
      path: output PNG; written atomically.
      metric: metric name to plot.
      title: figure title.
      num_resamples, seed: of the bootstrap.

    Returns:
      `path` as a `pathlib.Path`.

    Raises:
      ValueError when no row has `metric`.
    """
    # Imported here: only report writing needs matplotlib, and it costs ~0.5 s to import.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = _validate_rows(rows)
    available = _metric_names(rows)
    if metric not in available:
        raise ValueError(f"plot_results: no row has metric {metric!r}; rows have {available}")
    # (method, fraction) -> (mean, low, high): bootstrap over (repetition, case) where possible.
    points: dict[tuple[str, float], tuple[float, float, float]] = {}
    for e in summarize(rows):
        if e["metric"] == metric and e["n"] > 0:
            half = 0.0 if e["ci95"] is None else e["ci95"]
            points[e["method"], e["fraction"]] = (e["mean"], e["mean"] - half, e["mean"] + half)
    boot = bootstrap_summary(rows, metric, num_resamples=num_resamples, seed=seed)
    for key, ci in boot.items():
        points[key] = (ci["mean"], ci["low"], ci["high"])
    fractions = _fractions(rows)
    methods = _methods(rows)
    colors = method_colors(methods)
    plotted = [m for m in methods if any(k[0] == m for k in points)]

    fig = Figure(figsize=(7.5, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    log_x = _fraction_axis(ax, fractions)
    dodge = _dodger(fractions, len(plotted), log_x)
    for i, method in enumerate(plotted):
        pts = [(f, points[method, f]) for f in fractions if (method, f) in points]
        ax.errorbar(
            [dodge(100.0 * f, i) for f, _ in pts],
            [p[0] for _, p in pts],
            yerr=[[p[0] - p[1] for _, p in pts], [p[2] - p[0] for _, p in pts]],
            label=method,
            color=colors[method],
            marker="o",
            markersize=4,
            capsize=3,
            linestyle=_line_style(method),
        )
    if not plotted:
        ax.text(0.5, 0.5, f"no finite values of {metric}", ha="center", transform=ax.transAxes)
    ax.set_ylabel(metric + (" (lower is better)" if lower_is_better(metric) else ""))
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    _legend(ax, len(plotted))
    fig.tight_layout()
    return atomic_write(path, lambda f: fig.savefig(f, format="png"), binary=True)


def plot_paired(
    paired: Sequence[Mapping],
    path,
    *,
    metric: str,
    baseline: str,
    title: str,
    methods: Sequence[str] | None = None,
) -> pathlib.Path:
    """Draw the paired differences (method − `baseline`) of `metric` vs label fraction with their
    bootstrap 95% CI error bars (`paired_differences`), one line per method, a line at 0.

    Args:
      paired: `paired_differences` entries.
      path: output PNG; written atomically.
      metric, baseline: which entries to draw.
      title: figure title.
      methods: every method of the report in order, so that colours match `plot_results`;
        None: the methods of the entries.

    Raises:
      ValueError when no entry has this metric and baseline.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    entries = [
        e
        for e in paired
        if e["metric"] == metric and e["baseline"] == baseline and e["mean_diff"] is not None
    ]
    if not entries:
        raise ValueError(f"plot_paired: no finite paired difference of {metric!r} vs {baseline!r}")
    names = list(dict.fromkeys(e["method"] for e in entries))
    colors = method_colors(list(methods) if methods is not None else [baseline, *names])
    fractions = sorted({float(e["fraction"]) for e in paired})
    fig = Figure(figsize=(7.5, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    log_x = _fraction_axis(ax, fractions)
    dodge = _dodger(fractions, len(names), log_x)
    ax.axhline(0.0, color="0.3", linewidth=1.0)
    for i, method in enumerate(names):
        pts = sorted((float(e["fraction"]), e) for e in entries if e["method"] == method)
        ax.errorbar(
            [dodge(100.0 * f, i) for f, _ in pts],
            [e["mean_diff"] for _, e in pts],
            yerr=[
                [e["mean_diff"] - e["ci_low"] for _, e in pts],
                [e["ci_high"] - e["mean_diff"] for _, e in pts],
            ],
            label=method,
            color=colors.get(method),
            marker="o",
            markersize=4,
            capsize=3,
            linestyle=_line_style(method),
        )
    better = "< 0: method better" if lower_is_better(metric) else "> 0: method better"
    ax.set_ylabel(f"{metric}: method − {baseline} ({better})")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    _legend(ax, len(names))
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
    baselines: Sequence[str] = DEFAULT_BASELINES,
    num_resamples: int = NUM_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, pathlib.Path]:
    """Write results.csv, results_paired.csv, results.md and the plots into `out_dir`.

    Plots: one `results_<metric>.png` per metric (`plot_results`) and, where rows carry
    `per_case`, one `results_paired_<metric>.png` (`plot_paired`) of the differences against the
    first present baseline ('scratch', else 'random_warmup'). results_paired.csv holds every
    `paired_differences` entry (only its header when no row has per-case scores).

    Args:
      rows: result rows as in the module docstring.
      out_dir: output folder (created).
      metrics: metrics to plot; they come first in results.md, followed by any other metric of
        the rows.
      title: title of results.md and of the plots.
      notes: Markdown appended to results.md.
      baselines: methods to compare the others with, where present.
      num_resamples, seed: of every bootstrap.

    Returns:
      {"csv": path, "paired_csv": path, "md": path, "png_<metric>": path for each metric,
      "png_paired_<metric>": path for each metric with paired differences}.

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
    ordered = metrics + [m for m in available if m not in metrics]
    paired = paired_differences(
        rows, baselines=baselines, metrics=ordered, num_resamples=num_resamples, seed=seed
    )
    out = {
        "csv": write_results_csv(rows, out_dir / "results.csv"),
        "paired_csv": write_paired_csv(paired, out_dir / "results_paired.csv"),
        "md": write_results_md(
            rows, out_dir / "results.md", title=title, notes=notes, metrics=ordered, paired=paired
        ),
    }
    methods = _methods(rows)
    for metric in metrics:
        out[f"png_{metric}"] = plot_results(
            rows,
            out_dir / f"results_{_safe_name(metric)}.png",
            metric=metric,
            title=f"{title}: {metric}",
            num_resamples=num_resamples,
            seed=seed,
        )
    first = next((b for b in baselines if any(e["baseline"] == b for e in paired)), None)
    for metric in metrics:
        if first is None or not any(
            e["metric"] == metric and e["baseline"] == first and e["mean_diff"] is not None
            for e in paired
        ):
            continue
        out[f"png_paired_{metric}"] = plot_paired(
            paired,
            out_dir / f"results_paired_{_safe_name(metric)}.png",
            metric=metric,
            baseline=first,
            title=f"{title}: {metric}, paired difference vs {first}",
            methods=methods,
        )
    logger.info("wrote report to %s", out_dir)
    return out
