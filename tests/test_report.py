"""results.csv / results.md / PNG plots from experiment rows: statistics and file contents."""

from __future__ import annotations

import csv
import math

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
    assert set(out) == {"csv", "md", "png_WT", "png_WT_hd95"}
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
