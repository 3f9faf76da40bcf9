"""results.csv / results.md / PNG plots from experiment rows: statistics and file contents."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from ssl3d_jax import report

# t.ppf(0.975, df) from tables, so the CI check does not reuse scipy's own call.
T975 = {1: 12.706204736174698, 2: 4.302652729749464}


def _row(method, fraction, rep, n_lab, **m):
    return {
        "method": method,
        "fraction": fraction,
        "repetition": rep,
        "num_labeled": n_lab,
        "metrics": m,
    }


def _rows():
    rows = []
    for rep, (wt, hd) in enumerate([(0.7, 5.0), (0.8, 4.0), (0.9, 3.0)]):
        rows.append(_row("rpl", 0.1, rep, 2, WT=wt, WT_hd95=hd))
        rows.append(_row("rpl", 1.0, rep, 20, WT=wt + 0.05, WT_hd95=hd - 1))
        rows.append(_row("scratch", 0.1, rep, 2, WT=wt - 0.2, WT_hd95=hd + 2))
    rows.append(_row("scratch", 1.0, 0, 20, WT=0.7, WT_hd95=float("nan")))
    rows.append(_row("scratch", 1.0, 1, 20, WT=0.6, WT_hd95=6.0))
    rows.append(_row("rotation", 0.01, 0, 1, WT=0.3, WT_hd95=9.0))
    return rows


def _entry(summary, method, fraction, metric):
    (e,) = [
        e
        for e in summary
        if (e["method"], e["fraction"], e["metric"]) == (method, fraction, metric)
    ]
    return e


def test_summarize_t_confidence_interval():
    s = report.summarize(_rows())
    e = _entry(s, "rpl", 0.1, "WT")
    # values 0.7, 0.8, 0.9: mean 0.8, sample std 0.1, CI = t(0.975, 2) · 0.1 / √3
    assert (e["n"], e["n_nan"], e["num_labeled"]) == (3, 0, 2)
    assert e["mean"] == pytest.approx(0.8)
    assert e["std"] == pytest.approx(0.1)
    assert e["ci95"] == pytest.approx(T975[2] * 0.1 / math.sqrt(3), rel=1e-9)
    assert (e["min"], e["max"]) == (pytest.approx(0.7), pytest.approx(0.9))
    # One repetition: a mean, no interval.
    e = _entry(s, "rotation", 0.01, "WT")
    assert e["n"] == 1 and e["mean"] == pytest.approx(0.3) and e["ci95"] is None
    # Order: methods as first seen, then fraction, then metric.
    keys = [(e["method"], e["fraction"], e["metric"]) for e in s]
    assert keys[:4] == [
        ("rpl", 0.1, "WT"),
        ("rpl", 0.1, "WT_hd95"),
        ("rpl", 1.0, "WT"),
        ("rpl", 1.0, "WT_hd95"),
    ]
    assert keys[-1] == ("rotation", 0.01, "WT_hd95")


def test_summarize_skips_and_counts_nan():
    rows = [_row("m", 0.5, i, 3, HD=v) for i, v in enumerate([4.0, float("nan"), 6.0, None])]
    (e,) = report.summarize(rows)
    assert (e["n"], e["n_nan"]) == (2, 2)
    assert e["mean"] == pytest.approx(5.0)
    assert e["ci95"] == pytest.approx(T975[1] * math.sqrt(2) / math.sqrt(2))
    (e,) = report.summarize([_row("m", 0.5, 0, 3, HD=float("nan"))])
    assert (e["n"], e["n_nan"], e["mean"], e["ci95"]) == (0, 1, None, None)


def test_results_csv_round_trip(tmp_path):
    rows = _rows()
    path = report.write_results_csv(rows, tmp_path / "results.csv")
    with open(path, newline="") as f:
        lines = list(csv.DictReader(f))
    assert list(lines[0]) == ["method", "fraction", "repetition", "num_labeled", "WT", "WT_hd95"]
    assert len(lines) == len(rows)
    for line, row in zip(lines, rows, strict=True):
        assert line["method"] == row["method"]
        assert float(line["fraction"]) == row["fraction"]
        assert int(line["repetition"]) == row["repetition"]
        assert int(line["num_labeled"]) == row["num_labeled"]
        for m, v in row["metrics"].items():
            assert float(line[m]) == v or (math.isnan(v) and line[m] == "nan")
    back = report.read_results_csv(path)
    assert [r["method"] for r in back] == [r["method"] for r in rows]
    assert back[0]["metrics"] == rows[0]["metrics"]
    assert math.isnan(back[9]["metrics"]["WT_hd95"])
    # Written atomically: no temporary file left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


def test_results_csv_missing_metric_is_empty_cell(tmp_path):
    rows = [_row("a", 1.0, 0, 5, WT=0.5), _row("b", 1.0, 0, None, ET=0.25)]
    path = report.write_results_csv(rows, tmp_path / "r.csv")
    lines = path.read_text().splitlines()
    assert lines == [
        "method,fraction,repetition,num_labeled,ET,WT",
        "a,1.0,0,5,,0.5",
        "b,1.0,0,,0.25,",
    ]
    assert report.read_results_csv(path)[1] == {
        "method": "b",
        "fraction": 1.0,
        "repetition": 0,
        "num_labeled": None,
        "metrics": {"ET": 0.25},
    }


def test_results_md_tables(tmp_path):
    path = report.write_results_md(
        _rows(), tmp_path / "results.md", title="BraTS data efficiency", notes="Dataset: phantom."
    )
    text = path.read_text()
    assert text.startswith("# BraTS data efficiency\n")
    assert text.rstrip().endswith("Dataset: phantom.")
    for needle in ("## WT", "## WT_hd95", "| rpl |", "| scratch |", "| rotation |", "1%", "10%"):
        assert needle in text
    assert "| method | 1% | 10% | 100% |" in text
    wt = text.split("## WT\n")[1].split("## WT_hd95")[0]
    ci = T975[2] * 0.1 / math.sqrt(3)
    # Best WT per column is bold; rpl wins 10% and 100%.
    assert f"| **0.800 ± {ci:.3f} (n=3)** |" in wt
    assert "| rotation | **0.300 (n=1)** | – | – |" in wt
    assert "| scratch | – | 0.600 ± " in wt
    # HD95: lower is better, and the NaN repetition is reported as skipped.
    hd = text.split("## WT_hd95")[1]
    assert "**3.000 ± " in hd  # rpl at 100%: 4, 3, 2 mm
    assert "6.000 (n=1, 1 NaN skipped)" in hd
    assert "Labelled training cases: 1% → 1, 10% → 2, 100% → 20." in text


def _png_size(path):
    from matplotlib import image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return image.imread(path).shape


def test_plot_results_png(tmp_path):
    path = report.plot_results(_rows(), tmp_path / "wt.png", metric="WT", title="WT Dice")
    h, w, _ = _png_size(path)
    assert h > 100 and w > 100
    with pytest.raises(ValueError, match="ET"):
        report.plot_results(_rows(), tmp_path / "et.png", metric="ET", title="ET")


def test_write_report(tmp_path):
    out = report.write_report(
        _rows(), tmp_path / "out", metrics=["WT_hd95", "WT"], title="Phantom", notes="n"
    )
    # No per-case scores: results_paired.csv has only its header, no paired plot.
    assert set(out) == {"csv", "paired_csv", "md", "png_WT", "png_WT_hd95"}
    assert out["paired_csv"].read_text() == ",".join(report.PAIRED_COLUMNS) + "\n"
    assert "Paired differences" not in out["md"].read_text()
    assert out["png_WT"].name == "results_WT.png"
    for key in ("png_WT", "png_WT_hd95"):
        assert min(_png_size(out[key])[:2]) > 100
    md = out["md"].read_text()
    assert md.index("## WT_hd95") < md.index("## WT\n")  # requested order first
    assert len(report.read_results_csv(out["csv"])) == len(_rows())
    with pytest.raises(ValueError, match="Dice"):
        report.write_report(_rows(), tmp_path / "x", metrics=["Dice"], title="t")


def test_rows_are_validated():
    with pytest.raises(ValueError, match="metrics"):
        report.summarize([{"method": "a", "fraction": 0.1, "repetition": 0}])
    with pytest.raises(ValueError, match="fraction"):
        report.summarize([_row("a", 10, 0, 1, WT=1.0)])


def test_format_fraction_and_direction():
    assert [report.format_fraction(f) for f in (0.01, 0.025, 0.1, 1.0)] == [
        "1%",
        "2.5%",
        "10%",
        "100%",
    ]
    assert report.lower_is_better("ET_hd95") and not report.lower_is_better("kappa")
    # The finetuning's own names: 'HD95 <region>'.
    assert report.lower_is_better("HD95 WT") and not report.lower_is_better("WT")


# --- paired differences and the bootstrap ---------------------------------------------------------

CASES = [f"case_{i:02d}" for i in range(24)]


def _paired_rows(diff, *, reps=3, noise=0.01, seed=0, rep_offset=0.0, metric="WT"):
    """'scratch' and 'rpl' rows with per-case scores: rpl = scratch + diff + noise, per
    (repetition, case); each repetition shifts both methods by `rep_offset` · r."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(reps):
        base = {c: float(rng.uniform(0.3, 0.8)) + rep_offset * r for c in CASES}
        ours = {c: base[c] + diff + float(rng.normal(0.0, noise)) for c in CASES}
        for method, scores in (("scratch", base), ("rpl", ours)):
            per_case = {c: {metric: v} for c, v in scores.items()}
            rows.append(
                {
                    "method": method,
                    "fraction": 0.5,
                    "repetition": r,
                    "num_labeled": 4,
                    "metrics": {metric: float(np.mean(list(scores.values())))},
                    "per_case": per_case,
                }
            )
    return rows


def _only(paired, **match):
    (e,) = [e for e in paired if all(e[k] == v for k, v in match.items())]
    return e


def test_bootstrap_ci_of_a_constant_difference_excludes_zero():
    e = _only(report.paired_differences(_paired_rows(0.1)), method="rpl", baseline="scratch")
    assert e["mean_diff"] == pytest.approx(0.1, abs=0.005)
    assert e["ci_low"] < 0.1 < e["ci_high"]
    assert e["ci_low"] > 0.0 and e["resolved"]
    assert (e["n_cases"], e["n_repetitions"], e["n_pairs"], e["n_dropped"]) == (24, 3, 72, 0)
    assert e["ci_high"] - e["ci_low"] < 0.02  # the noise is 0.01 per case


def test_bootstrap_ci_of_zero_mean_noise_contains_zero_and_is_not_resolved(tmp_path):
    rows = _paired_rows(0.0, noise=0.05)
    e = _only(report.paired_differences(rows), method="rpl", baseline="scratch")
    assert e["ci_low"] < 0.0 < e["ci_high"] and not e["resolved"]
    md = report.results_markdown(rows, title="t")
    table = md.split("## Paired differences")[1]
    (line,) = [x for x in table.splitlines() if x.startswith("| rpl |")]
    assert "not resolved" in line and "**" not in line
    # The resolved difference is bold, without "not resolved".
    md = report.results_markdown(_paired_rows(0.1), title="t")
    (line,) = [x for x in md.split("## Paired differences")[1].splitlines() if "| rpl |" in x]
    assert line.startswith("| rpl | **+0.1") and "not resolved" not in line


def test_pairing_is_by_repetition_and_case_not_by_order():
    rows = _paired_rows(0.1, rep_offset=0.3)
    ref = report.paired_differences(rows)
    # Case order inside one method's rows and the order of the rows do not matter.
    shuffled = []
    rng = np.random.default_rng(5)
    for row in rows:
        row = dict(row)
        if row["method"] == "rpl":
            items = list(row["per_case"].items())
            rng.shuffle(items)
            row["per_case"] = dict(items)
        shuffled.append(row)
    assert report.paired_differences(shuffled[::-1]) == ref
    # Large between-repetition shifts cancel in the pairs: the CI stays as narrow as without them.
    e = _only(ref, method="rpl")
    assert e["ci_high"] - e["ci_low"] < 0.02 and e["resolved"]
    # Pairing the wrong repetitions (rpl's labels moved by one) mixes the shifts in.
    moved = [
        dict(r, repetition=(r["repetition"] + 1) % 3) if r["method"] == "rpl" else r for r in rows
    ]
    wrong = _only(report.paired_differences(moved), method="rpl")
    assert wrong["ci_high"] - wrong["ci_low"] > 0.1


def test_nan_scores_are_dropped_pairwise_and_counted():
    rows = _paired_rows(0.1, reps=2, metric="HD95 WT")
    rows[0]["per_case"]["case_00"] = {"HD95 WT": float("nan")}  # scratch, repetition 0
    rows[3]["per_case"]["case_01"] = {"HD95 WT": None}  # rpl, repetition 1
    e = _only(report.paired_differences(rows), method="rpl")
    assert (e["n_pairs"], e["n_dropped"], e["n_cases"], e["n_repetitions"]) == (46, 2, 24, 2)
    assert e["mean_diff"] == pytest.approx(0.1, abs=0.01)
    # HD95: lower is better; the table header says which sign favours the method.
    assert e["lower_is_better"]
    md = report.results_markdown(rows, title="t")
    assert "lower is better: < 0 means the method is better" in md
    assert "2 NaN pair(s) dropped" in md


def test_bootstrap_mean_ci_is_deterministic_and_two_way():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(3, 10))
    a = report.bootstrap_mean_ci(table, num_resamples=2000, seed=1)
    assert a == report.bootstrap_mean_ci(table, num_resamples=2000, seed=1)
    assert a["mean"] == pytest.approx(table.mean())
    assert (a["n_repetitions"], a["n_cases"], a["n_values"]) == (3, 10, 30)
    # A repetition-level shift widens the CI (repetitions are resampled), a case-level one too.
    shifted_reps = report.bootstrap_mean_ci(table + [[0.0], [3.0], [6.0]], num_resamples=2000)
    shifted_cases = report.bootstrap_mean_ci(table + np.arange(10) * 0.6, num_resamples=2000)
    for wide in (shifted_reps, shifted_cases):
        assert wide["high"] - wide["low"] > 2 * (a["high"] - a["low"])
    assert report.bootstrap_mean_ci(np.full((2, 3), np.nan)) is None


def test_write_report_with_per_case_rows(tmp_path):
    rows = _paired_rows(0.1)
    rows += [
        dict(
            r,
            method="random_warmup",
            per_case={c: {"WT": v["WT"] - 0.05} for c, v in r["per_case"].items()},
        )
        for r in rows
        if r["method"] == "scratch"
    ]
    out = report.write_report(rows, tmp_path, metrics=["WT"], title="Phantom")
    assert {"paired_csv", "png_paired_WT"} <= set(out)
    assert _png_size(out["png_paired_WT"])[0] > 100
    with open(out["paired_csv"], newline="") as f:
        lines = list(csv.DictReader(f))
    assert tuple(lines[0]) == report.PAIRED_COLUMNS
    assert {"method", "baseline", "mean_diff", "ci_low", "ci_high", "resolved"} <= set(lines[0])
    # Both baselines; every other method against each.
    pairs = {(x["method"], x["baseline"]) for x in lines}
    assert pairs == {
        ("rpl", "scratch"),
        ("random_warmup", "scratch"),
        ("scratch", "random_warmup"),
        ("rpl", "random_warmup"),
    }
    row = [x for x in lines if (x["method"], x["baseline"]) == ("rpl", "random_warmup")][0]
    assert float(row["mean_diff"]) == pytest.approx(0.15, abs=0.005)
    assert row["resolved"] == "true" and float(row["ci_low"]) > 0
    assert (row["n_cases"], row["n_repetitions"]) == ("24", "3")
    md = out["md"].read_text()
    assert "### WT vs scratch" in md and "### WT vs random_warmup" in md


def test_method_colors_are_distinct_for_many_methods():
    methods = [f"m{i}" for i in range(9)]
    colors = report.method_colors(methods)
    assert len(set(colors.values())) == 9
    assert len(set(report.method_colors([f"m{i}" for i in range(13)]).values())) == 13
